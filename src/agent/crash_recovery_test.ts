/**
 * Crashes at the worst moments of a task's handling: a child process runs the agent's task path
 * (id store, running journal, durable outbound queue, the agent's reporter) and dies by
 * `Deno.exit(9)` at a chosen point; the parent then starts as the agent does (opens the queue,
 * `recover()` with the final reports it holds) and checks that the task's outcome reaches the
 * server either way: its final report is in the queue, or recover() reports it.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { upTopic } from "../fleet/topics.ts";
import { realRunner, waitFor } from "../process/mod.ts";
import { Outbox, type OutboxEntry, resultTaken } from "./outbox.ts";
import { type TaskReport, TaskRunner } from "./task_runner.ts";
import { encodeTaskStatus } from "./task_status.ts";
import { fillDisk, freeDisk, PAGE, withTmpfs } from "./testing/tmpfs.ts";

const ROBOT = "robot-001";
const here = (f: string) => new URL(f, import.meta.url).href;

/**
 * The child: the agent's task path on `state`, `crash` says where it dies. Exits 9 when it
 * crashed where it was told to, 0 when it got through (and closed everything), 3 when the crash
 * point was never reached.
 */
const CHILD = `
import { Outbox, resultTaken } from "${here("./outbox.ts")}";
import { TaskRunner } from "${here("./task_runner.ts")}";
import { TaskIdStore } from "${here("./task_ids.ts")}";
import { TaskJournal } from "${here("./task_journal.ts")}";
import { encodeTaskStatus } from "${here("./task_status.ts")}";
import { upTopic } from "${here("../fleet/topics.ts")}";
import { fillDisk } from "${here("./testing/tmpfs.ts")}";
const [state, mnt, crash, task] = Deno.args;
const spec = JSON.parse(task);
const FINAL = ["done", "failed", "refused", "cancelled"];
if (crash === "after-claim") {
  const claim = TaskIdStore.prototype.claim;
  TaskIdStore.prototype.claim = async function (...a) {
    const first = await claim.apply(this, a);
    Deno.exit(9); // the id is on disk; nothing after it happened
  };
}
if (crash === "in-claim") {
  TaskIdStore.prototype.claim = () => Deno.exit(9); // the journal is written; the id is not
}
if (crash === "in-journal-write") {
  TaskJournal.prototype.write = () => Deno.exit(9);
}
const box = await Outbox.open({ stateDir: state, robotId: "${ROBOT}", maxMessages: 100, maxBytes: 1 << 20 });
const runner = new TaskRunner({ allow: spec.allow, stateDir: state, defaultCwd: mnt, killGraceMs: 200 });
const report = async (r) => {
  if (FINAL.includes(r.state)) {
    if (crash === "before-final-report") Deno.exit(9);
    if (crash === "disk-full-at-result") await fillDisk(mnt);
  }
  // What the agent does (agent.ts, report): queue it durably, answer the runner.
  return resultTaken(await box.add("result", upTopic("${ROBOT}", "task"), encodeTaskStatus("${ROBOT}", r)));
};
if (spec.cancel) await runner.cancel(spec.task.id, "cancelled by the fleet server", report, new Date().toISOString());
else await runner.handle(spec.task, report);
if (crash === "after-handle" || crash === "disk-full-at-result") Deno.exit(9); // no close(): a crash
await box.close();
await runner.ids.close();
Deno.exit(crash === "none" ? 0 : 3);
`;

interface Task {
  id: string;
  command: string[];
  env: Record<string, string>;
  timeoutSeconds: number;
}

async function child(
  state: string,
  dir: string,
  crash: string,
  task: Task,
  allow = ["*"],
  cancel = false,
) {
  const out = await realRunner.output(
    Deno.execPath(),
    ["eval", CHILD, state, dir, crash, JSON.stringify({ task, allow, cancel })],
    { check: false, timeoutMs: 60_000 },
  );
  return out;
}

/** The next start, as the agent does it: the queue, then recover() with its final reports. */
async function restart(state: string, dir: string) {
  const box = await Outbox.open({
    stateDir: state,
    robotId: ROBOT,
    maxMessages: 100,
    maxBytes: 1 << 20,
  });
  const queued = box.recovered.map((e) => e.message).filter((m) => m.type === "task-status");
  const finals = new Set(
    queued.filter((m) => ["done", "failed", "refused", "cancelled"].includes(m.state)).map((m) =>
      m.taskId
    ),
  );
  const runner = new TaskRunner({
    allow: ["*"],
    stateDir: state,
    defaultCwd: dir,
    killGraceMs: 200,
  });
  const reports: TaskReport[] = [];
  const recovered = await runner.recover((r) => (reports.push(r), true), (id) => finals.has(id));
  await box.close();
  return { queued, finals, recovered, reports, runner };
}

const bigOutput = (id: string): Task => ({
  id,
  // 8000 bytes of output: the result does not fit the rest of the queue file's page.
  command: ["printf", "%08000d", "0"],
  env: {},
  timeoutSeconds: 30,
});

Deno.test("crash after a result's write failed (full disk): the result or a report of the task survives", async () => {
  await withTmpfs(64 * PAGE, async (mnt) => {
    // Control: with room, the result is in the queue after the crash, and nothing else is said.
    const ok = join(mnt, "ok");
    const c = await child(ok, mnt, "after-handle", bigOutput("t-room"));
    assert.equal(c.code, 9, c.stderr);
    const control = await restart(ok, mnt);
    assert.ok(control.finals.has("t-room"), "with room, the result was queued and survives");
    assert.deepEqual(control.recovered, []);
    await control.runner.ids.close();

    // The disk fills just before the final report is queued; the process then dies.
    const full = join(mnt, "full");
    const f = await child(full, mnt, "disk-full-at-result", bigOutput("t-full"));
    assert.equal(f.code, 9, f.stderr);
    await freeDisk(mnt);
    const after = await restart(full, mnt);
    const reported = after.reports.filter((r) => r.taskId === "t-full");
    assert.ok(
      after.finals.has("t-full") ||
        (after.recovered.includes("t-full") && reported[0]?.error === "agent restarted"),
      `the result is lost: queue holds ${JSON.stringify(after.queued.map((m) => m.state))}, ` +
        `recover() reported ${JSON.stringify(after.recovered)}`,
    );
    // The disk was full until the crash: the result cannot be on disk; the journal told.
    assert.deepEqual(after.recovered, ["t-full"]);
    assert.equal(reported[0].state, "failed");
    await after.runner.ids.close();
  });
});

Deno.test("a result whose write failed is kept, retried, and the task leaves the journal once it is on disk", async () => {
  await withTmpfs(64 * PAGE, async (mnt) => {
    const state = join(mnt, "state");
    const logs: string[] = [];
    const log = (e: string) => logs.push(e);
    const box = await Outbox.open({
      stateDir: state,
      robotId: ROBOT,
      maxMessages: 100,
      maxBytes: 1 << 20,
      log,
    });
    const runner = new TaskRunner({
      allow: ["*"],
      stateDir: state,
      defaultCwd: mnt,
      killGraceMs: 200,
      log,
    });
    try {
      const entries: OutboxEntry[] = [];
      const outcome = await runner.handle(bigOutput("t-retry"), async (r) => {
        if (r.state === "done") await fillDisk(mnt);
        const e = await box.add("result", upTopic(ROBOT, "task"), encodeTaskStatus(ROBOT, r));
        if (r.state === "done") entries.push(e!);
        return resultTaken(e);
      });
      assert.equal(outcome, "run");
      const [done] = entries;
      // Control: the fault happened, and the agent says so.
      assert.equal(done.written, false, "the write failed on the full disk");
      assert.equal(box.stats.unwritten, 1);
      assert.ok(box.stats.writeErrors >= 1);
      assert.ok(logs.includes("outbox.write_failed"), logs.join(" "));
      assert.ok(logs.includes("task.report_not_durable"), logs.join(" "));
      assert.deepEqual(
        (await runner.journal.interrupted()).map((r) => r.taskId),
        ["t-retry"],
        "until the result is on disk, the task stays in the journal",
      );
      await freeDisk(mnt);
      // No other append comes: the retry timer writes it.
      assert.equal(await done.safe, true);
      assert.equal(box.stats.unwritten, 0);
      await waitFor(async () => (await runner.journal.interrupted()).length === 0, {
        timeoutMs: 10_000,
        what: "the journal record removed once the result is on disk",
      });
    } finally {
      await box.close();
      await runner.ids.close();
    }
    const again = await Outbox.open({
      stateDir: state,
      robotId: ROBOT,
      maxMessages: 100,
      maxBytes: 1 << 20,
    });
    const states = again.recovered.map((e) => e.message).filter((m) => m.type === "task-status")
      .map((m) => m.state);
    assert.ok(states.includes("done"), JSON.stringify(states));
    await again.close();
  });
});

Deno.test("crash right after the claim: the next start reports the task failed: agent restarted", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-crash-" });
  try {
    const state = join(dir, "state");
    const t: Task = { id: "t-claimed", command: ["true"], env: {}, timeoutSeconds: 30 };
    const c = await child(state, dir, "after-claim", t);
    assert.equal(c.code, 9, `the child crashed where told: ${c.stderr}`);
    const after = await restart(state, dir);
    // Control: the claim was durable (so a re-sent copy is a replay and never runs).
    assert.ok(await after.runner.ids.lookup("t-claimed"), "the id was claimed before the crash");
    assert.deepEqual(after.recovered, ["t-claimed"]);
    assert.deepEqual(
      after.reports.map((r) => `${r.taskId}:${r.state}:${r.error}`),
      ["t-claimed:failed:agent restarted"],
    );
    await after.runner.ids.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("crash before a refusal after the claim was queued: the next start reports the task", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-crash-" });
  try {
    const state = join(dir, "state");
    // Refused by the allow-list, after the claim; the process dies before the report is queued.
    const t: Task = { id: "t-refused", command: ["true"], env: {}, timeoutSeconds: 30 };
    const c = await child(state, dir, "before-final-report", t, ["echo"]);
    assert.equal(c.code, 9, `the child crashed where told: ${c.stderr}`);
    const after = await restart(state, dir);
    assert.ok(await after.runner.ids.lookup("t-refused"));
    assert.deepEqual(after.recovered, ["t-refused"]);
    assert.equal(after.reports[0]?.error, "agent restarted");
    await after.runner.ids.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("crash before anything was recorded: nothing is reported, and the re-sent task runs once", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-crash-" });
  try {
    const state = join(dir, "state");
    const t: Task = { id: "t-early", command: ["true"], env: {}, timeoutSeconds: 30 };
    // Control for the two above: a run without a crash leaves nothing to recover.
    const clean = await child(join(dir, "clean"), dir, "none", { ...t, id: "t-clean" });
    assert.equal(clean.code, 0, clean.stderr);
    const none = await restart(join(dir, "clean"), dir);
    assert.deepEqual(none.recovered, []);
    assert.ok(none.finals.has("t-clean"));
    await none.runner.ids.close();
    // The crash comes in the running journal's first write: nothing is claimed or reported
    // (the task ran nowhere), so the server's re-sent copy runs, once.
    const c = await child(state, dir, "in-journal-write", t);
    assert.equal(c.code, 9, c.stderr);
    const after = await restart(state, dir);
    assert.deepEqual(after.recovered, []);
    const reports: TaskReport[] = [];
    await after.runner.handle(t, (r) => reports.push(r));
    assert.deepEqual(reports.map((r) => r.state), ["accepted", "running", "done"]);
    assert.equal(await after.runner.handle(t, () => {}), "replay");
    await after.runner.ids.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("crash while the id is being claimed: reported, and the id is claimed at the next start", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-crash-" });
  try {
    const state = join(dir, "state");
    const t: Task = { id: "t-in-claim", command: ["true"], env: {}, timeoutSeconds: 30 };
    const c = await child(state, dir, "in-claim", t);
    assert.equal(c.code, 9, c.stderr);
    const after = await restart(state, dir);
    assert.deepEqual(after.recovered, ["t-in-claim"]);
    assert.equal(after.reports[0]?.error, "agent restarted");
    // It was reported failed: the copy the server may still send never runs.
    assert.equal(await after.runner.handle(t, () => {}), "replay");
    await after.runner.ids.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("crash between a cancel's claim and its report: the next start reports it cancelled", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-crash-" });
  try {
    const state = join(dir, "state");
    const t: Task = { id: "t-cancelled", command: ["true"], env: {}, timeoutSeconds: 30 };
    const c = await child(state, dir, "before-final-report", t, ["*"], true);
    assert.equal(c.code, 9, c.stderr);
    const after = await restart(state, dir);
    assert.equal((await after.runner.ids.lookup("t-cancelled"))?.cancelled, true);
    assert.deepEqual(
      after.reports.map((r) => `${r.state}:${r.error}`),
      ["cancelled:cancelled by the fleet server (before the task arrived; it will not run)"],
    );
    assert.equal(await after.runner.handle(t, () => {}), "replay", "the late task never runs");
    await after.runner.ids.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
