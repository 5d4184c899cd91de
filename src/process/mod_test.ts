import assert from "node:assert/strict";
import { join } from "node:path";
import { cmdlinesContaining } from "../../tests/helpers/secrets.ts";
import {
  isRecordAlive,
  parseProcStat,
  ProcessError,
  processStartTime,
  readPidFile,
  realRunner,
  RecordingRunner,
  stopPidFile,
  waitFor,
} from "./mod.ts";

Deno.test("output returns stdout and feeds stdin without touching argv", async () => {
  const r = await realRunner.output("cat", [], { stdin: "secret-on-stdin" });
  assert.equal(r.stdout, "secret-on-stdin");
  assert.equal(r.code, 0);
});

Deno.test("output throws ProcessError naming the command and its last stderr line", async () => {
  await assert.rejects(
    () => realRunner.output("sh", ["-c", "echo first >&2; echo 'the real reason' >&2; exit 3"]),
    (err: unknown) => {
      assert.ok(err instanceof ProcessError);
      assert.equal(err.result.code, 3);
      assert.match(err.message, /^sh -c failed \(exit 3\): the real reason$/);
      return true;
    },
  );
  const r = await realRunner.output("sh", ["-c", "exit 4"], { check: false });
  assert.equal(r.code, 4);
  assert.equal(r.success, false);
});

Deno.test("output reports a missing binary in one line", async () => {
  await assert.rejects(
    () => realRunner.output("k8s4r-no-such-binary", []),
    /k8s4r-no-such-binary: command not found/,
  );
});

Deno.test("spawn writes a 0600 pid file, logs to the file, waits for readiness, stops", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-proc-" });
  try {
    const marker = join(dir, "ready");
    const d = await realRunner.spawn({
      name: "sleeper",
      cmd: "sh",
      args: ["-c", `echo hello; touch ${marker}; exec sleep 60`],
      logFile: join(dir, "logs", "sleeper.log"),
      pidFile: join(dir, "sleeper.pid"),
      ready: async () => (await Deno.stat(marker).catch(() => null)) !== null,
    });
    const rec = readPidFile(join(dir, "sleeper.pid"));
    assert.ok(rec);
    assert.equal(rec.pid, d.pid);
    assert.equal((await Deno.stat(join(dir, "sleeper.pid"))).mode! & 0o777, 0o600);
    assert.ok(isRecordAlive(rec));
    await waitFor(
      async () => (await Deno.readTextFile(join(dir, "logs", "sleeper.log"))).includes("hello"),
      {
        timeoutMs: 5000,
      },
    );
    await d.stop(2000);
    assert.equal(processStartTime(d.pid), undefined);
    assert.equal(readPidFile(join(dir, "sleeper.pid")), undefined, "pid file removed");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("spawn fails with the log's last line when the daemon dies before it is ready", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-proc-" });
  try {
    await assert.rejects(
      () =>
        realRunner.spawn({
          name: "crasher",
          cmd: "sh",
          args: ["-c", "echo 'bind: address already in use'; exit 1"],
          logFile: join(dir, "crasher.log"),
          ready: () => Promise.resolve(false),
        }),
      /crasher exited with code 1 before it was ready .*bind: address already in use/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("spawn kills a daemon that never execs (no pid file, so nothing else could stop it)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-proc-" });
  const fifo = join(dir, "never-opened.fifo");
  await realRunner.output("mkfifo", [fifo]);
  try {
    // `sh` blocks opening a FIFO nobody writes: it stays the shell, so it never execs.
    await assert.rejects(
      () =>
        realRunner.spawn({
          name: "stuck",
          cmd: "sh",
          args: ["-c", 'read x < "$0"', fifo],
          logFile: join(dir, "stuck.log"),
          pidFile: join(dir, "stuck.pid"),
        }),
      /stuck to exec/,
    );
    assert.deepEqual(cmdlinesContaining(fifo), [], "the shell that never exec'd is gone");
    assert.equal(readPidFile(join(dir, "stuck.pid")), undefined, "no pid file was written");
  } finally {
    for (const pid of cmdlinesContaining(fifo)) {
      try {
        Deno.kill(pid, "SIGKILL");
      } catch { /* gone */ }
    }
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a log filter rewrites every line before it reaches the log", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-proc-" });
  try {
    const log = join(dir, "f.log");
    const d = await realRunner.spawn({
      name: "talker",
      cmd: "sh",
      args: ["-c", "echo 'token=abc123 ok'; echo 'second abc123'"],
      logFile: log,
      logFilter: (l) => l.replaceAll("abc123", "<redacted>"),
    });
    assert.equal(await d.exited, 0);
    assert.equal(await Deno.readTextFile(log), "token=<redacted> ok\nsecond <redacted>\n");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a daemon killed by a signal exits with 128+n, also for a crash (SIGSEGV, SIGABRT)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-proc-" });
  try {
    const codes: Record<string, number> = {};
    for (const [sig, n] of [["TERM", 15], ["SEGV", 11], ["ABRT", 6], ["BUS", 7]] as const) {
      const d = await realRunner.spawn({
        name: `crash-${sig}`,
        cmd: "sh",
        // The shell execs sh, which signals itself: the daemon's own process dies of it.
        args: ["-c", `kill -${sig} $$`],
        logFile: join(dir, `${sig}.log`),
      });
      codes[sig] = await d.exited;
      assert.equal(codes[sig], 128 + n, `SIG${sig}: ${JSON.stringify(codes)}`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("stopPidFile leaves alone a pid that now belongs to another process", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-proc-" });
  const other = new Deno.Command("sleep", { args: ["60"] }).spawn();
  try {
    const pidFile = join(dir, "x.pid");
    // A record with our victim's pid but another start time: a reused pid, not ours.
    await Deno.writeTextFile(
      pidFile,
      JSON.stringify({
        pid: other.pid,
        startTime: processStartTime(other.pid)! - 1,
        cmd: "sleep",
        args: ["60"],
        startedAt: new Date().toISOString(),
      }),
    );
    assert.equal(await stopPidFile(pidFile, 500), "not-running");
    assert.ok(processStartTime(other.pid) !== undefined, "the other process still runs");
  } finally {
    other.kill("SIGKILL");
    await other.status;
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("stopPidFile leaves alone a live pid with the right start time that runs another command, or a record of another boot", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-proc-" });
  const other = new Deno.Command("sleep", { args: ["60"] }).spawn();
  try {
    const pidFile = join(dir, "x.pid");
    const rec = (over: Record<string, unknown>) =>
      JSON.stringify({
        pid: other.pid,
        startTime: processStartTime(other.pid)!,
        cmd: "sleep",
        args: ["60"],
        startedAt: new Date().toISOString(),
        ...over,
      });
    // Pid and start time match, but the record says it started mosquitto: not ours.
    await Deno.writeTextFile(pidFile, rec({ cmd: "mosquitto", args: ["-c", "/x.conf"] }));
    assert.equal(await stopPidFile(pidFile, 500), "not-running");
    assert.ok(processStartTime(other.pid) !== undefined, "a sleep named mosquitto was stopped");
    // Right command, but the executable the record saw is another one.
    await Deno.writeTextFile(pidFile, rec({ exe: "/usr/sbin/mosquitto" }));
    assert.equal(await stopPidFile(pidFile, 500), "not-running");
    assert.ok(processStartTime(other.pid) !== undefined);
    // Right command, written before a reboot (another boot id): start times count from boot.
    await Deno.writeTextFile(pidFile, rec({ bootId: "00000000-0000-0000-0000-000000000000" }));
    assert.equal(await stopPidFile(pidFile, 500), "not-running");
    assert.ok(processStartTime(other.pid) !== undefined, "a record of another boot matched");
  } finally {
    other.kill("SIGKILL");
    await other.status;
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("stopPidFile stops what spawn started: its pid file records the boot and the executable (control)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-proc-" });
  try {
    const pidFile = join(dir, "s.pid");
    const d = await realRunner.spawn({
      name: "sleeper",
      cmd: "sleep",
      args: ["60"],
      logFile: join(dir, "s.log"),
      pidFile,
    });
    const rec = readPidFile(pidFile)!;
    assert.equal(rec.bootId, Deno.readTextFileSync("/proc/sys/kernel/random/boot_id").trim());
    assert.equal(rec.exe, Deno.readLinkSync(`/proc/${d.pid}/exe`));
    assert.equal(isRecordAlive(rec), true);
    assert.equal(await stopPidFile(pidFile, 2000), "stopped");
    assert.equal(processStartTime(d.pid), undefined);
    await d.exited;
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("spawn records the daemon's own executable, never the shell or setpriv it execs through (50 spawns)", async () => {
  // /proc/PID/cmdline is empty in the middle of an exec: taken for the daemon, it left the
  // shell's executable in about half of the pid files, which then matched nothing.
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-proc-" });
  try {
    const wrong: string[] = [];
    for (let i = 0; i < 50; i++) {
      const pidFile = join(dir, `s${i}.pid`);
      const d = await realRunner.spawn({
        name: "sleeper",
        cmd: "sleep",
        args: ["60"],
        logFile: join(dir, "s.log"),
        pidFile,
      });
      const rec = readPidFile(pidFile)!;
      if (!isRecordAlive(rec)) wrong.push(`#${i}: ${rec.exe}`);
      await d.stop(2000);
    }
    assert.deepEqual(wrong, [], "pid files that do not match their own daemon");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("spawn through unshare (PostgreSQL as root) records the program unshare execs (30 spawns, detached)", async () => {
  // CI saw it: a pid file that recorded `unshare`, caught before its exec, said "not running"
  // about the running PostgreSQL forever after, so its start timed out waiting for it.
  if (Deno.uid() !== 0) throw new Error("this test needs root (unshare --user as devenv runs it)");
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-proc-" });
  try {
    const wrong: string[] = [];
    for (let i = 0; i < 30; i++) {
      const pidFile = join(dir, `u${i}.pid`);
      const d = await realRunner.spawn({
        name: "sleeper",
        cmd: "unshare",
        args: ["--user", "--", "sleep", "60"],
        logFile: join(dir, "u.log"),
        pidFile,
        detached: true,
      });
      const rec = readPidFile(pidFile)!;
      if (!isRecordAlive(rec) || !rec.exe?.endsWith("/sleep")) wrong.push(`#${i}: ${rec.exe}`);
      // Positive control: the file stops what it names.
      assert.equal(await stopPidFile(pidFile, 2000), "stopped");
      await d.stop(1000);
    }
    assert.deepEqual(wrong, [], "pid files that do not match their own daemon");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a non-detached daemon dies with its parent, even on kill -9 (no orphan)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-proc-" });
  try {
    const script = join(dir, "parent.ts");
    const childPidFile = join(dir, "child.pid");
    await Deno.writeTextFile(
      script,
      `import { realRunner } from ${JSON.stringify(new URL("./mod.ts", import.meta.url).href)};
       await realRunner.spawn({ name: "c", cmd: "sleep", args: ["60"], logFile: ${
        JSON.stringify(join(dir, "c.log"))
      }, pidFile: ${JSON.stringify(childPidFile)} });
       console.log("spawned");
       await new Promise(() => {});`,
    );
    const parent = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", script],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const reader = parent.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let out = "";
    while (!out.includes("spawned")) out += (await reader.read()).value ?? "";
    reader.releaseLock();
    const rec = readPidFile(childPidFile)!;
    assert.ok(isRecordAlive(rec));
    parent.kill("SIGKILL");
    await parent.status;
    await parent.stdout.cancel().catch(() => {});
    await waitFor(() => !isRecordAlive(rec), { timeoutMs: 5000, what: "the orphan to die" });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("RecordingRunner records argv and fails like the real runner", async () => {
  const r = new RecordingRunner((cmd) =>
    cmd === "bad" ? { code: 2, stderr: "nope" } : { stdout: "x" }
  );
  assert.equal((await r.output("good", ["a"])).stdout, "x");
  await assert.rejects(() => r.output("bad", ["b"]), /bad b failed \(exit 2\): nope/);
  assert.deepEqual(r.calls.map((c) => [c.cmd, ...c.args]), [["good", "a"], ["bad", "b"]]);
});

Deno.test("parseProcStat: a command name with spaces and parentheses; the T state of a SIGSTOPped child", async () => {
  assert.deepEqual(
    parseProcStat("42 (a (b) c) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0"),
    { comm: "a (b) c", state: "S", ppid: 1, pgrp: 42, session: 42, startTime: 777 },
  );
  assert.equal(parseProcStat("garbage"), undefined);
  const child = new Deno.Command("sleep", { args: ["30"] }).spawn();
  try {
    const state = () => parseProcStat(Deno.readTextFileSync(`/proc/${child.pid}/stat`))?.state;
    await waitFor(() => state() === "S", { timeoutMs: 5000, what: "sleep to run" });
    Deno.kill(child.pid, "SIGSTOP");
    await waitFor(() => state() === "T", { timeoutMs: 5000, what: "state T after SIGSTOP" });
    Deno.kill(child.pid, "SIGCONT");
    await waitFor(() => state() === "S", { timeoutMs: 5000, what: "state S after SIGCONT" });
    assert.equal(parseProcStat(Deno.readTextFileSync(`/proc/${child.pid}/stat`))?.comm, "sleep");
  } finally {
    child.kill("SIGKILL");
    await child.status;
  }
});
