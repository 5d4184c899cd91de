import assert from "node:assert/strict";
import { processStartTime, readPidFile, realRunner, waitFor } from "../process/mod.ts";
import { descendants, stopComponent } from "./stop.ts";

Deno.test("stopComponent stops the pid-file process and any child it left behind", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const pidFile = `${dir}/c.pid`;
    // A parent that leaves an orphan when it is terminated (no parent-death signal).
    const d = await realRunner.spawn({
      name: "parent",
      cmd: "sh",
      // The background child exists before the parent execs: no race with the probe below.
      args: ["-c", "sleep 300 & exec sleep 301"],
      logFile: `${dir}/c.log`,
      pidFile,
      detached: true,
    });
    await waitFor(() => descendants(d.pid).length === 1, { timeoutMs: 5000, what: "the child" });
    const [kid] = descendants(d.pid);
    const line = await stopComponent({ name: "parent", pidFile }, 2000);
    assert.match(
      line,
      /^parent: stopped \(pid \d+\), 1 child process\(es\) gone after 1 had to be stopped$/,
    );
    assert.equal(processStartTime(d.pid), undefined);
    assert.notEqual(processStartTime(kid.pid), kid.startTime);
    assert.equal(readPidFile(pidFile), undefined);
    assert.equal(await stopComponent({ name: "parent", pidFile }), "parent: not running");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("stopComponent never touches a pid whose start time does not match", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const pidFile = `${dir}/x.pid`;
    // Our own pid with a wrong start time: a reused pid must be left alone.
    await Deno.writeTextFile(
      pidFile,
      JSON.stringify({ pid: Deno.pid, startTime: 1, cmd: "x", args: [], startedAt: "" }),
    );
    assert.equal(await stopComponent({ name: "x", pidFile }), "x: not running");
    assert.ok(processStartTime(Deno.pid) !== undefined);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
