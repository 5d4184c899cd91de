import assert from "node:assert/strict";
import { join } from "node:path";
import { waitFor } from "../process/mod.ts";
import { isAllowed, type TaskReport, TaskRunner, type TaskSpec } from "./task_runner.ts";

async function withRunner(
  allow: string[],
  fn: (r: TaskRunner, dir: string) => Promise<void>,
  extra: { maxOutputBytes?: number; killGraceMs?: number } = {},
) {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-tasks-" });
  try {
    const r = new TaskRunner({
      allow,
      stateDir: join(dir, "state"),
      defaultCwd: dir,
      killGraceMs: extra.killGraceMs ?? 200,
      maxOutputBytes: extra.maxOutputBytes,
      baseEnv: { PATH: "/usr/local/bin:/usr/bin:/bin", HOME: "/home/nobody-test" },
    });
    await fn(r, dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function task(id: string, command: string[], more: Partial<TaskSpec> = {}): TaskSpec {
  return { id, command, env: {}, timeoutSeconds: 30, ...more };
}

async function run(r: TaskRunner, t: TaskSpec): Promise<TaskReport[]> {
  const reports: TaskReport[] = [];
  await r.handle(t, (x) => reports.push(x));
  return reports;
}

Deno.test("allow-list: * allows all, otherwise exact names or paths", () => {
  assert.equal(isAllowed(["*"], "/bin/rm"), true);
  assert.equal(isAllowed(["echo"], "echo"), true);
  assert.equal(isAllowed(["echo"], "/bin/echo"), false);
  assert.equal(isAllowed(["/bin/echo"], "/bin/echo"), true);
  assert.equal(isAllowed([], "echo"), false);
});

Deno.test("no shell: $HOME is passed literally, env comes from the task", async () => {
  await withRunner(["*"], async (r) => {
    const reports = await run(r, task("t1", ["echo", "$HOME", "a;b", "`id`"]));
    assert.deepEqual(reports.map((x) => x.state), ["accepted", "running", "done"]);
    const done = reports[2];
    assert.equal(done.exitCode, 0);
    assert.equal(done.stdout, "$HOME a;b `id`\n");
    const env = await run(
      r,
      task("t2", ["sh", "-c", 'echo "$FOO:$HOME"'], { env: { FOO: "bar" } }),
    );
    assert.equal(env[2].stdout, "bar:/home/nobody-test\n");
  });
});

Deno.test("a refused executable is reported, not dropped; empty list refuses all", async () => {
  await withRunner(["echo"], async (r) => {
    const reports = await run(r, task("t1", ["/bin/echo", "x"]));
    assert.deepEqual(reports, [{
      taskId: "t1",
      state: "refused",
      error: 'executable "/bin/echo" is not in tasks.allow',
    }]);
  });
  await withRunner([], async (r) => {
    const reports = await run(r, task("t1", ["echo"]));
    assert.equal(reports[0].state, "refused");
    assert.equal(reports[0].error, "no task may run: tasks.allow is empty in the agent config");
  });
});

Deno.test("a missing executable or cwd fails with a clear error", async () => {
  await withRunner(["*"], async (r, dir) => {
    const a = await run(r, task("t1", ["no-such-program-k8s4r"]));
    assert.deepEqual(a.map((x) => x.state), ["accepted", "failed"]);
    assert.equal(a[1].error, "executable not found: no-such-program-k8s4r (searched PATH)");
    const b = await run(r, task("t2", ["/nonexistent/bin/x"]));
    assert.equal(b[1].error, "executable not found: /nonexistent/bin/x");
    const c = await run(r, task("t3", ["echo"], { cwd: join(dir, "missing") }));
    assert.equal(c[1].error, `working directory ${join(dir, "missing")}: does not exist`);
  });
});

Deno.test("non-zero exit is done with its exit code and stderr", async () => {
  await withRunner(["*"], async (r) => {
    const rep = await run(r, task("t1", ["sh", "-c", "echo oops >&2; exit 3"]));
    assert.equal(rep[2].state, "done");
    assert.equal(rep[2].exitCode, 3);
    assert.equal(rep[2].stderr, "oops\n");
  });
});

Deno.test("a task id runs at most once, also across runner restarts", async () => {
  await withRunner(["*"], async (r, dir) => {
    const first = await run(r, task("same", ["echo", "1"]));
    assert.equal(first.length, 3);
    const again: TaskReport[] = [];
    assert.equal(await r.handle(task("same", ["echo", "1"]), (x) => again.push(x)), "duplicate");
    assert.deepEqual(again, []);
    const r2 = new TaskRunner({
      allow: ["*"],
      stateDir: join(dir, "state"),
      defaultCwd: dir,
      killGraceMs: 100,
    });
    assert.equal(await r2.handle(task("same", ["echo", "1"]), () => {}), "duplicate");
    const mode = (await Deno.stat(join(dir, "state", "task-ids.json"))).mode! & 0o777;
    assert.equal(mode, 0o600);
  });
});

Deno.test("remembered ids are bounded", async () => {
  await withRunner(["*"], async (_r, dir) => {
    const r = new TaskRunner({
      allow: [],
      stateDir: join(dir, "s"),
      defaultCwd: dir,
      killGraceMs: 100,
      maxRememberedIds: 3,
    });
    for (const id of ["a", "b", "c", "d"]) await r.handle(task(id, ["x"]), () => {});
    const saved = JSON.parse(await Deno.readTextFile(join(dir, "s", "task-ids.json")));
    assert.deepEqual(saved.ids, ["b", "c", "d"]);
  });
});

Deno.test("output is bounded to the last bytes", async () => {
  await withRunner(["*"], async (r) => {
    const rep = await run(
      r,
      task("big", ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done"]),
    );
    const out = rep[2].stdout!;
    assert.ok(out.length <= 1024, `kept ${out.length}`);
    assert.ok(out.endsWith("line1999\n"));
    assert.ok(!out.includes("line0\n"));
  }, { maxOutputBytes: 1024 });
});

Deno.test("timeout: SIGTERM first; SIGKILL after the grace when SIGTERM is ignored", async () => {
  await withRunner(["*"], async (r) => {
    const polite = await run(r, task("t1", ["sleep", "30"], { timeoutSeconds: 1 }));
    const last = polite[polite.length - 1];
    assert.equal(last.state, "failed");
    assert.equal(last.exitCode, null);
    assert.equal(last.error, "timed out after 1s; stopped with SIGTERM");
    const stubborn = await run(
      r,
      task("t2", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"], {
        timeoutSeconds: 1,
      }),
    );
    const l2 = stubborn[stubborn.length - 1];
    assert.equal(l2.state, "failed");
    assert.equal(
      l2.error,
      "timed out after 1s; stopped with SIGKILL (SIGTERM was ignored for 300 ms)",
    );
    assert.equal(l2.stdout, "ready\n");
  }, { killGraceMs: 300 });
});

Deno.test("stopAll cancels running tasks and reports them", async () => {
  await withRunner(["*"], async (r) => {
    const reports: TaskReport[] = [];
    const p = r.handle(task("long", ["sleep", "30"]), (x) => reports.push(x));
    await waitFor(() => reports.some((x) => x.state === "running"), { timeoutMs: 10_000 });
    await r.stopAll();
    await p;
    assert.equal(reports[reports.length - 1].error, "agent stopping; stopped with SIGTERM");
    assert.equal(r.runningCount, 0);
  });
});

// ---------------------------------------------------------------------------------------------
// At most once: the id store (issue 10, item 2)

import { TaskIdStore } from "./task_runner.ts";

Deno.test("TaskIdStore: after a restart, [B, A] claimed at once refuses A, which ran", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-ids-" });
  try {
    const file = join(dir, "task-ids.json");
    assert.equal(await new TaskIdStore(file).claim("A"), true);
    // A restarted agent: dispatchFor re-sends B and A at once on register.
    const restarted = new TaskIdStore(file);
    assert.deepEqual(await Promise.all([restarted.claim("B"), restarted.claim("A")]), [
      true,
      false,
    ]);
    const again = new TaskIdStore(file);
    assert.deepEqual(await Promise.all([again.claim("A"), again.claim("B")]), [false, false]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("TaskIdStore: parallel claims all succeed, are all durable, leave no temp file", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-ids-" });
  try {
    const file = join(dir, "task-ids.json");
    const store = new TaskIdStore(file);
    const ids = ["a", "b", "c", ...Array.from({ length: 20 }, (_, i) => `t${i}`)];
    assert.deepEqual(await Promise.all(ids.map((id) => store.claim(id))), ids.map(() => true));
    const saved = JSON.parse(await Deno.readTextFile(file));
    assert.deepEqual([...saved.ids].sort(), [...ids].sort());
    const fresh = new TaskIdStore(file);
    assert.deepEqual(await Promise.all(ids.map((id) => fresh.claim(id))), ids.map(() => false));
    const names = [];
    for await (const e of Deno.readDir(dir)) names.push(e.name);
    assert.deepEqual(names, ["task-ids.json"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a task id that cannot be recorded is refused and never run", async () => {
  await withRunner(["*"], async (r, dir) => {
    // Positive control: the same runner records and runs a task.
    const ok = await run(r, task("ok", ["touch", join(dir, "ran-ok")]));
    assert.deepEqual(ok.map((x) => x.state), ["accepted", "running", "done"]);
    await Deno.stat(join(dir, "ran-ok"));
    // Now the id file cannot be replaced (a directory took its place).
    const file = join(dir, "state", "task-ids.json");
    await Deno.remove(file);
    await Deno.mkdir(file);
    const rep = await run(r, task("t2", ["touch", join(dir, "ran-t2")]));
    assert.equal(rep.length, 1);
    assert.equal(rep[0].state, "refused");
    assert.match(rep[0].error!, /^cannot record task id: /);
    await assert.rejects(Deno.stat(join(dir, "ran-t2")), Deno.errors.NotFound);
  });
});

// ---------------------------------------------------------------------------------------------
// Results bounded by their encoded size (issue 10, item 3)

import {
  decodeUp,
  encode,
  MAX_PAYLOAD_BYTES,
  now,
  PROTOCOL_VERSION,
  type TaskStatusMessage,
} from "../mqtt/messages.ts";

/** The longest robot id: the worst case for the envelope. */
const LONG_ROBOT = "r".repeat(63);

function asMessage(r: TaskReport): Uint8Array {
  const msg = {
    v: PROTOCOL_VERSION,
    type: "task-status",
    robotId: LONG_ROBOT,
    ts: now(),
    ...r,
  } as TaskStatusMessage;
  return encode(msg);
}

function assertFits(r: TaskReport): TaskStatusMessage {
  const bytes = asMessage(r);
  assert.ok(bytes.byteLength <= MAX_PAYLOAD_BYTES, `${bytes.byteLength} bytes`);
  const d = decodeUp(`k8s4r/robots/${LONG_ROBOT}/up/task`, bytes);
  assert.ok(d.ok, d.ok ? "" : `${d.reason}: ${d.error}`);
  return d.message as TaskStatusMessage;
}

const utf8Bytes = (s: string) => new TextEncoder().encode(s).byteLength;

Deno.test("70000 NUL bytes: the result fits 256 KiB encoded, tail kept, cut marked", async () => {
  await withRunner(["*"], async (r) => {
    const rep = await run(r, task("nul", ["head", "-c", "70000", "/dev/zero"]));
    const done = rep[rep.length - 1];
    assert.equal(done.state, "done");
    const m = assertFits(done);
    assert.ok(m.stdout!.length > 1000, `kept ${m.stdout!.length}`);
    assert.match(m.stdout!, /^\0+$/);
    assert.equal(m.stdoutTruncatedBytes! + utf8Bytes(m.stdout!), 70000);
    assert.equal(m.stderrTruncatedBytes, undefined);
  });
});

Deno.test("both streams at their limit: each bounded, the sum fits", async () => {
  await withRunner(["*"], async (r) => {
    const rep = await run(
      r,
      task("both", ["sh", "-c", "head -c 70000 /dev/zero; head -c 70000 /dev/zero >&2"]),
    );
    const m = assertFits(rep[rep.length - 1]);
    assert.equal(m.stdoutTruncatedBytes! + utf8Bytes(m.stdout!), 70000);
    assert.equal(m.stderrTruncatedBytes! + utf8Bytes(m.stderr!), 70000);
    // Split fairly: neither stream is starved.
    assert.ok(m.stdout!.length > 10_000 && m.stderr!.length > 10_000);
  });
});

Deno.test("multi-byte UTF-8 and control characters: a whole-character tail that fits", async () => {
  await withRunner(["*"], async (r) => {
    // stdout: 70000 control bytes (6 bytes each in JSON); stderr: 2-, 3-, 4-byte characters
    // with a control byte between them, 110000 bytes in all.
    const unit = "\u0001é€😀"; // 1 + 2 + 3 + 4 bytes
    const script = `head -c 70000 /dev/zero | tr '\\000' '\\001'; ` +
      `i=0; while [ $i -lt 11000 ]; do printf '${unit}' >&2; i=$((i+1)); done`;
    const rep = await run(r, task("mb", ["sh", "-c", script]));
    const done = rep[rep.length - 1];
    assert.equal(done.state, "done", done.error ?? "");
    const m = assertFits(done);
    const full = unit.repeat(11000);
    assert.ok(m.stderr!.length > 1000);
    assert.ok(full.endsWith(m.stderr!), "stderr is a tail of the output");
    assert.ok(!m.stderr!.includes("\ufffd"), "no character cut in half");
    assert.equal(m.stderrTruncatedBytes! + utf8Bytes(m.stderr!), utf8Bytes(full));
    assert.equal(m.stdoutTruncatedBytes! + utf8Bytes(m.stdout!), 70000);
  });
});

// ---------------------------------------------------------------------------------------------
// expiresAt (issue 10, item 4)

Deno.test("a task arriving after its expiresAt is refused and never run", async () => {
  await withRunner(["*"], async (r, dir) => {
    const late = await run(r, {
      ...task("late", ["touch", join(dir, "ran-late")]),
      expiresAt: new Date(Date.now() - 1000).toISOString(),
    } as TaskSpec);
    assert.equal(late.length, 1);
    assert.equal(late[0].state, "refused");
    assert.match(late[0].error!, /^expired: /);
    await assert.rejects(Deno.stat(join(dir, "ran-late")), Deno.errors.NotFound);
    // Positive control: one that is still valid runs.
    const inTime = await run(r, {
      ...task("in-time", ["touch", join(dir, "ran-in-time")]),
      expiresAt: new Date(Date.now() + 60_000).toISOString(),
    } as TaskSpec);
    assert.deepEqual(inTime.map((x) => x.state), ["accepted", "running", "done"]);
    await Deno.stat(join(dir, "ran-in-time"));
  });
});
