import assert from "node:assert/strict";
import { join } from "node:path";
import { waitFor } from "../process/mod.ts";
import { TaskRunner } from "./task_runner.ts";
import {
  cgroup2Mount,
  detectContainment,
  isTaskCgroupPath,
  judgeCgroup,
  judgeContainment,
  locateCgroup,
  TaskCgroup,
} from "./task_cgroup.ts";

const UNIFIED =
  "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
const HYBRID = [
  "31 25 0:27 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755",
  "40 31 0:37 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory",
  "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw",
  "",
].join("\n");
const V1_ONLY = "40 31 0:37 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n";
const UNIT = "0::/system.slice/k8s4r-agent.service\n";

Deno.test("cgroup2Mount / locateCgroup: unified, hybrid, v1 only, read-only, a container's root", () => {
  assert.deepEqual(cgroup2Mount(HYBRID), {
    root: "/",
    mountPoint: "/sys/fs/cgroup/unified",
    readOnly: false,
  });
  assert.deepEqual(locateCgroup(UNIFIED, `12:pids:/x\n${UNIT}`), {
    ok: true,
    parent: "/sys/fs/cgroup/system.slice/k8s4r-agent.service",
    own: "/system.slice/k8s4r-agent.service",
    readOnly: false,
  });
  const hybrid = locateCgroup(HYBRID, "0::/\n");
  assert.ok(hybrid.ok && hybrid.parent === "/sys/fs/cgroup/unified");
  const v1 = locateCgroup(V1_ONLY, "4:memory:/x\n");
  assert.ok(!v1.ok && /no cgroup v2 hierarchy/.test(v1.reason));
  const ro = locateCgroup(UNIFIED.replace(" rw,nosuid", " ro,nosuid"), UNIT);
  assert.ok(ro.ok && ro.readOnly);
  // A container whose cgroup2 mount is a subtree: paths are relative to its root.
  const sub = "50 40 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
  const inside = locateCgroup(sub, "0::/kubepods/pod1/app\n");
  assert.ok(inside.ok && inside.parent === "/sys/fs/cgroup/app");
  const outside = locateCgroup(sub, "0::/other\n");
  assert.ok(!outside.ok && /outside the cgroup2 mount/.test(outside.reason));
  // Escaped mount points (\040 is a space).
  assert.equal(
    cgroup2Mount("1 2 0:1 / /mnt/my\\040cg rw - cgroup2 none rw\n")?.mountPoint,
    "/mnt/my cg",
  );
});

Deno.test("judgeCgroup: root or the owner may; read-only, another owner, no cgroup.kill may not", () => {
  const loc = locateCgroup(UNIFIED, UNIT);
  const parent = "/sys/fs/cgroup/system.slice/k8s4r-agent.service";
  assert.deepEqual(judgeCgroup(loc, 0, 0, true), { kind: "cgroup", parent });
  assert.deepEqual(judgeCgroup(loc, 1000, 1000, true), { kind: "cgroup", parent });
  const cases: [ReturnType<typeof judgeCgroup>, RegExp][] = [
    [judgeCgroup(loc, 1000, 0, true), /belongs to uid 0, not to the agent \(uid 1000\)/],
    [judgeCgroup(loc, 0, undefined, true), /is not there/],
    [judgeCgroup(loc, 0, 0, false), /older than Linux 5\.14/],
    [
      judgeCgroup(locateCgroup(UNIFIED.replace(" rw,nosuid", " ro,nosuid"), UNIT), 0, 0, true),
      /mounted read-only/,
    ],
    [judgeCgroup(locateCgroup(V1_ONLY, ""), 0, 0, true), /cgroup v1 only/],
  ];
  for (const [j, why] of cases) {
    assert.equal(j.kind, "none");
    if (j.kind === "none") {
      assert.match(j.reason, why);
      assert.ok(j.hint.length > 0, "every refusal has a hint");
    }
  }
  // The root cgroup has no cgroup.kill of its own: the probe decides.
  assert.equal(judgeCgroup(locateCgroup(HYBRID, "0::/\n"), 0, 0, false).kind, "cgroup");
});

Deno.test("detectContainment on this machine: a cgroup each (root, cgroup v2)", () => {
  assert.equal(Deno.uid(), 0, "containment needs root here (cgroup v2): run it as root (CI does)");
  const c = detectContainment();
  assert.equal(c.kind, "cgroup", c.kind === "none" ? `${c.reason}; ${c.hint}` : "");
  // The same facts, judged without the probe, agree.
  assert.equal(
    judgeContainment({
      uid: 0,
      mountinfo: Deno.readTextFileSync("/proc/self/mountinfo"),
      procCgroup: Deno.readTextFileSync("/proc/self/cgroup"),
      owner: (p) => {
        try {
          return Deno.statSync(p).uid ?? undefined;
        } catch {
          return undefined;
        }
      },
    }).kind,
    "cgroup",
  );
});

Deno.test("TaskCgroup: only k8s4r-task-* paths; destroy kills what is in it and removes it (root)", async () => {
  assert.equal(Deno.uid(), 0, "containment needs root here (cgroup v2): run it as root (CI does)");
  assert.equal(isTaskCgroupPath("/sys/fs/cgroup/k8s4r-task-1-t"), true);
  assert.equal(isTaskCgroupPath("/sys/fs/cgroup/system.slice"), false);
  assert.equal(isTaskCgroupPath("k8s4r-task-1-t"), false);
  assert.equal(isTaskCgroupPath("/sys/fs/cgroup/k8s4r-task-1/../x"), false);
  assert.throws(() => new TaskCgroup("/sys/fs/cgroup/system.slice"), /not a task cgroup/);
  const c = detectContainment();
  assert.ok(c.kind === "cgroup", c.kind === "none" ? c.reason : "");
  const cg = await TaskCgroup.create(TaskCgroup.pathFor(c.parent, "cgtest"));
  let child: Deno.ChildProcess | undefined;
  try {
    await assert.rejects(TaskCgroup.create(cg.path), Deno.errors.AlreadyExists);
    child = new Deno.Command("sh", {
      args: ["-c", 'echo 0 > "$0" && exec sleep 600', cg.procsFile],
      stdout: "null",
    }).spawn();
    const pid = child.pid;
    await waitFor(async () => (await cg.pids()).includes(pid), {
      timeoutMs: 5000,
      what: "the process to enter the cgroup",
    });
    assert.deepEqual(await cg.pids(), [pid], "positive control: the process entered the cgroup");
    assert.equal(await cg.populated(), true);
    assert.equal(await cg.destroy(), 1);
    const st = await child.status;
    assert.equal(st.signal, "SIGKILL");
    assert.equal(cg.exists(), false);
    assert.equal(await cg.destroy(), 0, "destroying it again finds nothing");
  } finally {
    try {
      child?.kill("SIGKILL");
    } catch { /* gone */ }
    await child?.status;
    await cg.destroy().catch(() => {});
  }
});

Deno.test("TaskCgroup: a task that makes sub-cgroups and moves processes into them is killed and removed whole (root)", async () => {
  assert.equal(Deno.uid(), 0, "containment needs root here (cgroup v2): run it as root (CI does)");
  const c = detectContainment();
  assert.ok(c.kind === "cgroup", c.kind === "none" ? c.reason : "");
  const cg = await TaskCgroup.create(TaskCgroup.pathFor(c.parent, "cgsub"));
  let child: Deno.ChildProcess | undefined;
  const deeper = `${cg.path}/a/b`;
  try {
    // The task (running as the agent's uid: it owns its cgroup) makes a/b, moves a setsid'd
    // sleep there, and leaves itself in a (not in the task's cgroup itself any more).
    const script = [
      'echo 0 > "$0/cgroup.procs"',
      'mkdir -p "$0/a/b"',
      `setsid sh -c 'echo 0 > "$0/a/b/cgroup.procs"; exec sleep 600' "$0" &`,
      'echo 0 > "$0/a/cgroup.procs"',
      "exec sleep 600",
    ].join("\n");
    child = new Deno.Command("sh", { args: ["-c", script, cg.path], stdout: "null" }).spawn();
    const readPids = async (p: string) =>
      (await Deno.readTextFile(`${p}/cgroup.procs`).catch(() => "")).split("\n").filter(Boolean);
    await waitFor(async () => (await readPids(deeper)).length === 1, {
      timeoutMs: 5000,
      what: "the setsid'd process to enter a/b",
    });
    await waitFor(async () => (await readPids(`${cg.path}/a`)).length === 1, {
      timeoutMs: 5000,
      what: "the task to enter a",
    });
    const inner = Number((await readPids(deeper))[0]);
    assert.deepEqual(await cg.pids(), [], "nothing is left in the task's own cgroup");
    assert.equal(await cg.populated(), true, "control: its subtree is populated");
    await cg.destroy();
    const st = await child.status;
    assert.equal(st.signal, "SIGKILL");
    assert.equal(cg.exists(), false, "the task's cgroup and its sub-cgroups are removed");
    // Gone, or a zombie its new parent has not reaped yet: either way no longer running.
    const state = (() => {
      try {
        return Deno.readTextFileSync(`/proc/${inner}/stat`).replace(/^.*\) /s, "")[0];
      } catch {
        return "gone";
      }
    })();
    assert.ok(state === "gone" || state === "Z", `the setsid'd process survived (${state})`);
  } finally {
    try {
      child?.kill("SIGKILL");
    } catch { /* gone */ }
    await child?.status;
    await cg.destroy().catch(() => {});
  }
});

Deno.test("TaskCgroup.pathFor: an id that would name a cgroup elsewhere is refused", () => {
  const parent = "/sys/fs/cgroup/system.slice/k8s4r-agent.service";
  // Control: a task id names a child of the agent's cgroup.
  assert.equal(
    TaskCgroup.pathFor(parent, "t-1_A"),
    `${parent}/k8s4r-task-${Deno.pid}-t-1_A`,
  );
  for (const id of ["a/../../../k8s4r-task-x", "../x", "a/b", "", "a\nb", ".."]) {
    assert.throws(() => TaskCgroup.pathFor(parent, id), /not a task id/, JSON.stringify(id));
  }
});

// ---------------------------------------------------------------------------------------------
// The start's sweep of leftover task cgroups (`recover`)

/** The pid of a process that has exited (and been reaped): a gone agent's. */
async function deadPid(): Promise<number> {
  const p = new Deno.Command("true").spawn();
  await p.status;
  return p.pid;
}

/** A task runner over `parent`, its log as `event cgroup-or-task` lines in `logs`. */
function sweepRunner(dir: string, parent: string, logs: string[] = []): TaskRunner {
  return new TaskRunner({
    allow: ["*"],
    stateDir: join(dir, "state"),
    defaultCwd: dir,
    killGraceMs: 200,
    path: "/usr/bin:/bin",
    containment: { kind: "cgroup", parent },
    log: (event, f) => logs.push(`${event} ${String(f.cgroup ?? f.task ?? "")}`),
  });
}

interface SweepRig {
  parent: string;
  runner: TaskRunner;
  logs: string[];
  /** A process to kill afterwards. */
  track(p: Deno.ChildProcess): Deno.ChildProcess;
  /** A task-named cgroup under the parent, destroyed afterwards. */
  cgroup(name: string): Promise<TaskCgroup>;
  /** A `sleep 600` moved into `cg`, once it is there. */
  inCgroup(cg: TaskCgroup): Promise<Deno.ChildProcess>;
}

/** A real parent cgroup of its own (root, cgroup v2) and a runner over it; all cleaned up. */
async function withSweepRig(fn: (rig: SweepRig) => Promise<void>): Promise<void> {
  assert.equal(Deno.uid(), 0, "containment needs root here (cgroup v2): run it as root (CI does)");
  const c = detectContainment();
  assert.ok(c.kind === "cgroup", c.kind === "none" ? c.reason : "");
  const parent = join(c.parent, `k8s4r-sweep-test-${crypto.randomUUID().slice(0, 8)}`);
  await Deno.mkdir(parent);
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-sweep-" });
  const procs: Deno.ChildProcess[] = [];
  const cgs: TaskCgroup[] = [];
  const logs: string[] = [];
  const runner = sweepRunner(dir, parent, logs);
  const track = (p: Deno.ChildProcess) => (procs.push(p), p);
  try {
    await fn({
      parent,
      runner,
      logs,
      track,
      cgroup: async (name) => {
        const cg = await TaskCgroup.create(join(parent, name));
        cgs.push(cg);
        return cg;
      },
      inCgroup: async (cg) => {
        const p = track(
          new Deno.Command("sh", {
            args: ["-c", 'echo 0 > "$0" && exec sleep 600', cg.procsFile],
            stdout: "null",
          }).spawn(),
        );
        await waitFor(async () => (await cg.pids()).includes(p.pid), {
          timeoutMs: 5000,
          what: `a process in ${cg.path}`,
        });
        return p;
      },
    });
  } finally {
    for (const p of procs) {
      try {
        p.kill("SIGKILL");
      } catch { /* gone */ }
      await p.status;
    }
    for (const cg of cgs) await cg.destroy().catch(() => {});
    for await (const e of Deno.readDir(parent)) {
      await Deno.remove(join(parent, e.name)).catch(() => {});
    }
    await Deno.remove(parent).catch(() => {});
    await runner.stopAll();
    await runner.ids.close();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("recover: the task cgroups a dead run of this agent left are killed and removed; a live agent's, another agent's and other cgroups are not (root)", async () => {
  await withSweepRig(async ({ parent, runner, logs, track, cgroup, inCgroup }) => {
    // A dead agent's pid (a process that has exited), a live "agent" (a process that runs).
    const dead = await deadPid();
    const otherAgent = track(
      new Deno.Command("sleep", { args: ["600"], stdout: "null" }).spawn(),
    );
    const left = await cgroup(`k8s4r-task-${dead}-left-1`);
    const emptyLeft = await cgroup(`k8s4r-task-${dead}-left-2`);
    const live = await cgroup(`k8s4r-task-${otherAgent.pid}-live-1`);
    // Another agent's (sharing the parent): a task id this one never claimed.
    const notOurs = await cgroup(`k8s4r-task-${dead}-not-ours-1`);
    for (const id of ["left-1", "left-2", "live-1"]) await runner.ids.claim(id, Date.now());
    const notTask = join(parent, "not-a-task-cgroup");
    await Deno.mkdir(notTask);
    const leftProc = await inCgroup(left);
    const liveProc = await inCgroup(live);
    await runner.recover(() => true);
    await runner.stopAll(); // the sweep runs in the background: this waits for it
    assert.equal(left.exists(), false, `the leftover is removed: ${logs.join("; ")}`);
    assert.equal((await leftProc.status).signal, "SIGKILL", "what was in it is killed");
    assert.equal(emptyLeft.exists(), false, "an empty leftover is removed too");
    assert.ok(logs.includes(`task.cgroup_left_removed ${left.path}`), logs.join("; "));
    // Positive control of "left alone": the live agent's task runs on, in its cgroup.
    assert.equal(live.exists(), true, "a live agent's task cgroup stays");
    assert.deepEqual(await live.pids(), [liveProc.pid]);
    assert.ok((await Deno.stat(notTask)).isDirectory, "a cgroup not named k8s4r-task-* stays");
    assert.equal(notOurs.exists(), true, "a task this agent never claimed is its agent's to clean");
  });
});

Deno.test("recover: a leftover cgroup that cannot be emptied yet (D state) neither holds up recover nor is tried twice in one start", async () => {
  // A fake of a task cgroup whose process is stuck in uninterruptible sleep: `cgroup.kill` is
  // taken, `cgroup.events` stays `populated 1`. "Its process finally dies" = its interface
  // files go (a real cgroup's go with its rmdir), so the empty directory can be removed.
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-sweep-stuck-" });
  const parent = join(dir, "cg");
  await Deno.mkdir(parent);
  const dead = await deadPid();
  const stuck = async (id: string) => {
    const p = join(parent, `k8s4r-task-${dead}-${id}`);
    await Deno.mkdir(p);
    await Deno.writeTextFile(join(p, "cgroup.events"), "populated 1\nfrozen 0\n");
    await Deno.writeTextFile(join(p, "cgroup.procs"), "4242\n");
    await Deno.writeTextFile(join(p, "cgroup.kill"), "");
    return p;
  };
  const dies = async (p: string) => {
    for (const f of ["cgroup.events", "cgroup.procs", "cgroup.kill"]) await Deno.remove(join(p, f));
  };
  const left = await stuck("left-1"); // no journal record: the sweep's
  const listed = await stuck("listed-1"); // in the journal: recover's own destroy tries it
  const logs: string[] = [];
  const runner = sweepRunner(dir, parent, logs);
  try {
    await runner.ids.claim("left-1", Date.now()); // this agent's task, its journal record gone
    await runner.journal.write({
      taskId: "listed-1",
      claimedAt: new Date().toISOString(),
      createdAt: new Date().toISOString(),
      cgroup: listed,
    });
    await runner.recover(() => true);
    // recover tried the journal's cgroup (and could not empty it): that is its own wait.
    assert.ok(logs.includes("task.interrupted_kill_failed listed-1"), logs.join("; "));
    // The sweep runs on after recover returned (the agent connects meanwhile): the stuck
    // leftover's process dies now, and the sweep that is still waiting for it removes it.
    assert.ok(
      !logs.some((l) => l.startsWith("task.cgroup_remove_failed")),
      `the sweep has not given up on a cgroup before recover returned: ${logs.join("; ")}`,
    );
    // The sweep has killed it and waits for it to empty (`cgroup.kill` written).
    await waitFor(
      async () => (await Deno.readTextFile(join(left, "cgroup.kill")).catch(() => "")) === "1",
      { timeoutMs: 5000, what: "the sweep's kill of the leftover" },
    );
    await dies(left);
    await runner.stopAll(); // waits for the sweep
    assert.ok(logs.includes(`task.cgroup_left_removed ${left}`), logs.join("; "));
    assert.equal(await Deno.stat(left).then(() => true, () => false), false, "removed");
    // What recover's destroy just tried is not waited for a second time in this start.
    assert.ok(!logs.some((l) => l.endsWith(` ${listed}`)), logs.join("; "));
    assert.ok((await Deno.stat(listed)).isDirectory, "left for the next start");
  } finally {
    await runner.stopAll();
    await runner.ids.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("recover: a leftover-looking cgroup holding a process of another pid namespace is left alone (its agent may live there) (root)", async () => {
  await withSweepRig(async ({ runner, track, cgroup, inCgroup }) => {
    const dead = await deadPid();
    // In a pid namespace of its own (a container's agent and its task, as this host sees them).
    const ns = track(
      new Deno.Command("unshare", { args: ["--pid", "--fork", "sleep", "600"], stdout: "null" })
        .spawn(),
    );
    let inner = 0;
    await waitFor(async () => {
      const kids = (await Deno.readTextFile(`/proc/${ns.pid}/task/${ns.pid}/children`)).trim();
      inner = Number(kids.split(/\s+/)[0] || 0);
      return inner > 0;
    }, { timeoutMs: 5000, what: "the namespaced sleep" });
    assert.notEqual(
      await Deno.readLink(`/proc/${inner}/ns/pid`),
      await Deno.readLink("/proc/self/ns/pid"),
      "control: the sleep is in another pid namespace",
    );
    const foreign = await cgroup(`k8s4r-task-${dead}-foreign-1`);
    const ours = await cgroup(`k8s4r-task-${dead}-ours-1`);
    for (const id of ["foreign-1", "ours-1"]) await runner.ids.claim(id, Date.now());
    await Deno.writeTextFile(foreign.procsFile, String(inner));
    const local = await inCgroup(ours);
    await runner.recover(() => true);
    await runner.stopAll(); // waits for the sweep
    assert.equal(ours.exists(), false, "positive control: a leftover of this namespace is removed");
    assert.equal((await local.status).signal, "SIGKILL");
    assert.equal(foreign.exists(), true, "the other namespace's cgroup stays");
    assert.deepEqual(await foreign.pids(), [inner], "and its process runs on");
  });
});
