import assert from "node:assert/strict";
import { join } from "node:path";
import { processStartTime, waitFor } from "../process/mod.ts";
import { TaskJournal } from "./task_journal.ts";
import { type TaskReport, TaskRunner } from "./task_runner.ts";

/** A `sleep 600` in its own process group and session, as the runner starts tasks. */
function sleeper(): { pid: number; startTime: number; child: Deno.ChildProcess } {
  const child = new Deno.Command("sleep", { args: ["600"], detached: true, stdout: "null" })
    .spawn();
  return { pid: child.pid, startTime: processStartTime(child.pid)!, child };
}

const alive = (pid: number, startTime: number) => processStartTime(pid) === startTime;

function runner(stateDir: string, dir: string) {
  return new TaskRunner({ allow: ["*"], stateDir, defaultCwd: dir, killGraceMs: 200 });
}

Deno.test("recover: kills an interrupted task's group, spares a reused pid, reports both", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-journal-" });
  const ours = sleeper();
  const stranger = sleeper();
  try {
    const state = join(dir, "state");
    const j = new TaskJournal(state);
    await j.write({
      taskId: "ours",
      claimedAt: new Date().toISOString(),
      pid: ours.pid,
      startTime: ours.startTime,
      pgid: ours.pid,
    });
    // Same pid, another start time: the pid was reused by a process that is not our task.
    await j.write({
      taskId: "reused",
      claimedAt: new Date().toISOString(),
      pid: stranger.pid,
      startTime: stranger.startTime - 1,
      pgid: stranger.pid,
    });
    await j.write({ taskId: "never-spawned", claimedAt: new Date().toISOString() });
    const reports: TaskReport[] = [];
    const ids = await runner(state, dir).recover((r) => reports.push(r));
    assert.deepEqual([...ids].sort(), ["never-spawned", "ours", "reused"]);
    assert.ok(!alive(ours.pid, ours.startTime), "the interrupted task is stopped");
    assert.ok(alive(stranger.pid, stranger.startTime), "a reused pid is never signalled");
    assert.deepEqual(
      reports.map((r) => `${r.taskId}:${r.state}:${r.error}`).sort(),
      [
        "never-spawned:failed:agent restarted",
        "ours:failed:agent restarted",
        "reused:failed:agent restarted",
      ],
    );
    assert.deepEqual(await j.interrupted(), []);
  } finally {
    for (const p of [ours, stranger]) {
      try {
        p.child.kill("SIGKILL");
      } catch { /* gone */ }
      await p.child.status;
    }
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("recover: a group whose leader died is still found and stopped", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-journal-" });
  let orphan: number | undefined;
  try {
    // The leader starts a grandchild in its group, prints its pid and exits once its stdin
    // closes: its start time is read while it surely runs (a leader that had exited already
    // had none, and the journal record then named no process: the test failed now and then).
    const leader = new Deno.Command("sh", {
      args: ["-c", "sleep 600 >/dev/null 2>&1 & echo $!; read _"],
      detached: true,
      stdin: "piped",
      stdout: "piped",
    }).spawn();
    const leaderStart = processStartTime(leader.pid);
    assert.ok(leaderStart !== undefined, "the leader's start time, read while it runs");
    await leader.stdin.close();
    const out = await leader.output();
    orphan = Number(new TextDecoder().decode(out.stdout).trim());
    const orphanStart = processStartTime(orphan)!;
    assert.ok(alive(orphan, orphanStart), "positive control: the grandchild runs");
    const state = join(dir, "state");
    await new TaskJournal(state).write({
      taskId: "t1",
      claimedAt: new Date().toISOString(),
      pid: leader.pid,
      startTime: leaderStart,
      pgid: leader.pid,
    });
    const reports: TaskReport[] = [];
    await runner(state, dir).recover((r) => reports.push(r));
    await waitFor(() => !alive(orphan!, orphanStart), { timeoutMs: 5000, what: "orphan gone" });
    assert.equal(reports[0].error, "agent restarted");
  } finally {
    if (orphan) {
      try {
        Deno.kill(orphan, "SIGKILL");
      } catch { /* gone */ }
    }
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("recover: no second report for a task whose final report is already queued", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-journal-" });
  try {
    const state = join(dir, "state");
    const j = new TaskJournal(state);
    await j.write({ taskId: "done-before-crash", claimedAt: new Date().toISOString() });
    await j.write({ taskId: "cut", claimedAt: new Date().toISOString() });
    const reports: TaskReport[] = [];
    await runner(state, dir).recover((r) => reports.push(r), (id) => id === "done-before-crash");
    assert.deepEqual(reports.map((r) => r.taskId), ["cut"]);
    assert.deepEqual(await j.interrupted(), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a running task is journaled with its process, and forgotten after its report", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-journal-" });
  try {
    const state = join(dir, "state");
    const r = runner(state, dir);
    const reports: TaskReport[] = [];
    const p = r.handle(
      { id: "j1", command: ["sleep", "30"], env: {}, timeoutSeconds: 30 },
      (x) => reports.push(x),
    );
    await waitFor(() => reports.some((x) => x.state === "running"), { timeoutMs: 10_000 });
    const [rec] = await r.journal.interrupted();
    assert.equal(rec.taskId, "j1");
    assert.equal(typeof rec.pid, "number");
    assert.equal(rec.startTime, processStartTime(rec.pid!));
    assert.equal(rec.pgid, rec.pid);
    // setpriv (PR_SET_PDEATHSIG) exec'd the task itself: the pid is the task's own.
    assert.match(Deno.readTextFileSync(`/proc/${rec.pid}/cmdline`), /^\/\S*\/sleep\0/); // the resolved path
    await r.stopAll();
    await p;
    assert.deepEqual(await r.journal.interrupted(), []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
