import assert from "node:assert/strict";
import { join } from "node:path";
import { processStartTime, waitFor } from "../process/mod.ts";
import { TaskJournal } from "./task_journal.ts";
import { detectContainment, TaskCgroup } from "./task_cgroup.ts";
import { sandboxArgv } from "./task_sandbox.ts";
import { type TaskReport, TaskRunner } from "./task_runner.ts";
import { processesWith } from "./testing/processes.ts";

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
    // Not a speed check: on a loaded machine (the suite runs files in parallel) the kill and the
    // reaping of an orphan by pid 1 can take seconds. What it must not do is survive.
    await waitFor(() => !alive(orphan!, orphanStart), { timeoutMs: 20_000, what: "orphan gone" })
      .catch((err) => {
        let st = "gone";
        try {
          st = Deno.readTextFileSync(`/proc/${orphan}/stat`);
        } catch { /* gone */ }
        throw new Error(`${(err as Error).message}; /proc/${orphan}/stat: ${st}`);
      });
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

Deno.test("recover: a crash's task is killed with its whole cgroup, setsid'd descendants included (root)", async () => {
  assert.equal(Deno.uid(), 0, "containment needs root here (cgroup v2): run it as root (CI does)");
  const c = detectContainment();
  assert.equal(c.kind, "cgroup", c.kind === "none" ? `${c.reason}; ${c.hint}` : "");
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-journal-" });
  const marker = `k8s4r-marker-${crypto.randomUUID()}`;
  /** Live processes whose argv carries the marker, and their descendants. */
  const withMarker = () => processesWith(marker);
  const atRuntime = (m: string) => `"$(echo ${m.replaceAll("-", "_")} | tr _ -)"`;
  const cg = await TaskCgroup.create(
    TaskCgroup.pathFor(c.kind === "cgroup" ? c.parent : "", "crashed"),
  );
  let leader: Deno.ChildProcess | undefined;
  try {
    // What a crash leaves: the leader (PR_SET_PDEATHSIG killed it with the agent) and what it
    // moved to another session, still running, in the task's cgroup.
    const argv = sandboxArgv({
      exe: "/bin/sh",
      args: [
        "-c",
        `setsid sh -c 'sleep 4545; :' ${atRuntime(marker)} </dev/null >/dev/null 2>&1 & sleep 600`,
      ],
      limits: { cpuSeconds: 60, memoryBytes: 1 << 30, openFiles: 64 },
      cgroupProcs: cg.procsFile,
    });
    leader = new Deno.Command(argv.cmd, { args: argv.args, detached: true, stdout: "null" })
      .spawn();
    await waitFor(() => withMarker().length > 0, { timeoutMs: 10_000, what: "the descendant" });
    const state = join(dir, "state");
    await new TaskJournal(state).write({
      taskId: "crashed",
      claimedAt: new Date().toISOString(),
      pid: leader.pid,
      startTime: processStartTime(leader.pid)!,
      pgid: leader.pid,
      cgroup: cg.path,
    });
    leader.kill("SIGKILL");
    await leader.status;
    assert.ok(withMarker().length > 0, "positive control: the descendant outlived the leader");
    const reports: TaskReport[] = [];
    await runner(state, dir).recover((r) => reports.push(r));
    assert.deepEqual(withMarker(), [], "nothing of the task is left");
    assert.equal(cg.exists(), false, "its cgroup is removed");
    assert.deepEqual(reports.map((r) => `${r.taskId}:${r.state}:${r.error}`), [
      "crashed:failed:agent restarted",
    ]);
  } finally {
    for (const pid of withMarker()) {
      try {
        Deno.kill(pid, "SIGKILL");
      } catch { /* gone */ }
    }
    await cg.destroy().catch(() => {});
    await Deno.remove(dir, { recursive: true });
  }
});
