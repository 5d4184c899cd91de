/**
 * Containment of a task and of everything it starts: one cgroup v2 per task, a child of the
 * agent's own cgroup (`<agent's cgroup>/k8s4r-task-<agent pid>-<task id>`). The task enters it
 * before it runs (its first process writes itself into `cgroup.procs`, then execs prlimit,
 * setpriv and the task: children inherit the cgroup, and neither `setsid` nor a double fork
 * leaves it), and `cgroup.kill` (Linux 5.14) SIGKILLs every process in it at once, forks racing
 * the kill included. `cgroup.events` tells when it is empty; then it is removed.
 *
 * Needs a writable cgroup v2 hierarchy: the agent runs as root (the unit `k8s4r agent service`
 * writes has `Delegate=yes`), or as a user its cgroup is delegated to. A task running as
 * `tasks.user` cannot leave its cgroup: the cgroup files belong to the agent's uid. A task
 * running as the agent's own uid could (it owns them): that is one more reason for `tasks.user`.
 *
 * Where none of this is available (cgroup v1 only, a read-only /sys/fs/cgroup, a non-root agent
 * without delegation, Linux < 5.14), `detectContainment` says why, the agent logs it, the doctor
 * warns, and tasks are stopped through their process group only: what a task moves to another
 * session (`setsid`) then outlives it.
 */
import { basename, isAbsolute, join } from "node:path";
import { processStartTime, waitFor } from "../process/mod.ts";
import { TASK_ID_RE } from "../mqtt/messages.ts";

/** Every per-task cgroup's name starts with this (recovery touches nothing else). */
export const TASK_CGROUP_PREFIX = "k8s4r-task-";

export type Containment =
  | { kind: "cgroup"; parent: string }
  | { kind: "none"; reason: string; hint: string };

export const HINT_SYSTEMD =
  "run the agent from the unit of `k8s4r agent service` (root, Delegate=yes), or as root";

/** The first cgroup2 mount of a /proc/PID/mountinfo text. */
export function cgroup2Mount(
  mountinfo: string,
): { mountPoint: string; root: string; readOnly: boolean } | undefined {
  const unescape = (s: string) =>
    s.replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8)));
  for (const line of mountinfo.split("\n")) {
    const sep = line.indexOf(" - ");
    if (sep < 0) continue;
    const [fstype] = line.slice(sep + 3).split(" ");
    if (fstype !== "cgroup2") continue;
    const f = line.slice(0, sep).split(" ");
    if (f.length < 6) continue;
    return {
      root: unescape(f[3]),
      mountPoint: unescape(f[4]),
      readOnly: f[5].split(",").includes("ro"),
    };
  }
  return undefined;
}

/** The cgroup v2 path of a /proc/PID/cgroup text (`0::/path`). */
export function cgroup2Path(procCgroup: string): string | undefined {
  const line = procCgroup.split("\n").find((l) => l.startsWith("0::"));
  return line === undefined ? undefined : line.slice(3);
}

/** Where the agent's cgroup v2 directory is, from its mountinfo and /proc/self/cgroup. */
export type CgroupLocation =
  | { ok: true; parent: string; own: string; readOnly: boolean }
  | { ok: false; reason: string; hint: string };

export function locateCgroup(mountinfo: string, procCgroup: string): CgroupLocation {
  const m = cgroup2Mount(mountinfo);
  if (!m) {
    return {
      ok: false,
      reason: "no cgroup v2 hierarchy is mounted (cgroup v1 only)",
      hint:
        "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1; the default since Debian 11 and Ubuntu 21.10)",
    };
  }
  const own = cgroup2Path(procCgroup);
  if (own === undefined) {
    return {
      ok: false,
      reason: "this process is in no cgroup v2 (/proc/self/cgroup has no 0:: line)",
      hint: HINT_SYSTEMD,
    };
  }
  const rootPrefix = m.root === "/" ? "" : m.root;
  if (rootPrefix && own !== rootPrefix && !own.startsWith(rootPrefix + "/")) {
    return {
      ok: false,
      reason: `the agent's cgroup ${own} is outside the cgroup2 mount at ${m.mountPoint}`,
      hint: HINT_SYSTEMD,
    };
  }
  return {
    ok: true,
    parent: join(m.mountPoint, own.slice(rootPrefix.length)).replace(/(.)\/+$/, "$1"),
    own,
    readOnly: m.readOnly,
  };
}

/** What the containment judgement needs to know of the host. */
export interface ContainmentFacts {
  uid: number;
  mountinfo: string;
  procCgroup: string;
  /** Owner uid of a path, undefined when it does not exist. */
  owner(path: string): number | undefined;
}

/**
 * Whether tasks can each get a cgroup in a located cgroup directory, or why not and what to do.
 * `parentOwner`: owner uid of the directory (undefined: not there); `hasKill`: whether it has
 * `cgroup.kill` (the root cgroup never has: then the probe of `detectContainment` tells).
 */
export function judgeCgroup(
  loc: CgroupLocation,
  uid: number,
  parentOwner: number | undefined,
  hasKill: boolean,
): Containment {
  if (!loc.ok) return { kind: "none", reason: loc.reason, hint: loc.hint };
  const { parent } = loc;
  if (loc.readOnly) {
    return {
      kind: "none",
      reason: `cgroup2 is mounted read-only (${parent})`,
      hint: `${HINT_SYSTEMD}; in a container, give it a writable cgroup namespace`,
    };
  }
  if (parentOwner === undefined) {
    return {
      kind: "none",
      reason: `the agent's cgroup ${parent} is not there`,
      hint: HINT_SYSTEMD,
    };
  }
  if (uid !== 0 && parentOwner !== uid) {
    return {
      kind: "none",
      reason:
        `the agent's cgroup ${parent} belongs to uid ${parentOwner}, not to the agent (uid ${uid})`,
      hint: `${HINT_SYSTEMD}; or delegate it (systemd: Delegate=yes)`,
    };
  }
  if (!hasKill && loc.own !== "/") {
    return {
      kind: "none",
      reason: `no cgroup.kill in ${parent}: the kernel is older than Linux 5.14`,
      hint: "run a Linux 5.14 or newer kernel",
    };
  }
  return { kind: "cgroup", parent };
}

/** `locateCgroup` + `judgeCgroup` on the facts (synchronous). */
export function judgeContainment(f: ContainmentFacts): Containment {
  const loc = locateCgroup(f.mountinfo, f.procCgroup);
  if (!loc.ok) return judgeCgroup(loc, f.uid, undefined, false);
  return judgeCgroup(
    loc,
    f.uid,
    f.owner(loc.parent),
    f.owner(join(loc.parent, "cgroup.kill")) !== undefined,
  );
}

function ownerOf(path: string): number | undefined {
  try {
    return Deno.statSync(path).uid ?? undefined;
  } catch {
    return undefined;
  }
}

/** This host's facts for `judgeContainment`, read from /proc. */
export function hostContainmentFacts(): ContainmentFacts {
  const read = (p: string) => {
    try {
      return Deno.readTextFileSync(p);
    } catch {
      return "";
    }
  };
  return {
    uid: Deno.uid() ?? -1,
    mountinfo: read("/proc/self/mountinfo"),
    procCgroup: read("/proc/self/cgroup"),
    owner: ownerOf,
  };
}

/**
 * Whether this process can contain tasks: the judgement, then a real probe (a child cgroup
 * made and removed, with `cgroup.kill` in it).
 */
export function detectContainment(facts = hostContainmentFacts()): Containment {
  const j = judgeContainment(facts);
  if (j.kind !== "cgroup") return j;
  const probe = join(j.parent, `k8s4r-probe-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`);
  try {
    Deno.mkdirSync(probe);
  } catch (err) {
    return {
      kind: "none",
      reason: `cannot create a cgroup in ${j.parent}: ${(err as Error).message}`,
      hint: HINT_SYSTEMD,
    };
  }
  try {
    if (ownerOf(join(probe, "cgroup.kill")) === undefined) {
      return {
        kind: "none",
        reason: `no cgroup.kill in ${probe}: the kernel is older than Linux 5.14`,
        hint: "run a Linux 5.14 or newer kernel",
      };
    }
  } finally {
    try {
      Deno.removeSync(probe);
    } catch { /* an empty cgroup (no process ever entered it): harmless */ }
  }
  return j;
}

/** True for a path `TaskCgroup` could have made (recovery refuses to touch anything else). */
export function isTaskCgroupPath(path: string): boolean {
  return isAbsolute(path) && basename(path).startsWith(TASK_CGROUP_PREFIX) &&
    !path.split("/").includes("..");
}

/** The agent pid and task id in a task cgroup's name (`TaskCgroup.pathFor`), if it is one. */
export function parseTaskCgroupName(
  name: string,
): { agentPid: number; taskId: string } | undefined {
  const m = /^k8s4r-task-(\d+)-(.+)$/.exec(name);
  if (!m || !TASK_ID_RE.test(m[2])) return undefined;
  return { agentPid: Number(m[1]), taskId: m[2] };
}

/** One task's cgroup. */
export class TaskCgroup {
  constructor(readonly path: string) {
    if (!isTaskCgroupPath(path)) throw new Error(`not a task cgroup: ${path}`);
  }

  /**
   * The name a task's cgroup gets under `parent` (unique per agent process and task id). The
   * id is checked again here (messages.ts checks it on arrival): one with `/` or `..` would
   * name a cgroup elsewhere in the hierarchy, which `destroy` would then kill.
   */
  static pathFor(parent: string, taskId: string): string {
    if (!TASK_ID_RE.test(taskId)) throw new Error(`not a task id: ${JSON.stringify(taskId)}`);
    return join(parent, `${TASK_CGROUP_PREFIX}${Deno.pid}-${taskId}`);
  }

  /** Makes the cgroup; fails when it exists (another task's) or cannot be made. */
  static async create(path: string): Promise<TaskCgroup> {
    const cg = new TaskCgroup(path);
    await Deno.mkdir(path);
    return cg;
  }

  get procsFile(): string {
    return join(this.path, "cgroup.procs");
  }

  exists(): boolean {
    return ownerOf(this.path) !== undefined;
  }

  /** The pids in it (not in its children). */
  pids(): Promise<number[]> {
    return cgroupProcs(this.path);
  }

  /** Whether any process is in it or in a child cgroup. */
  async populated(): Promise<boolean> {
    try {
      const ev = await Deno.readTextFile(join(this.path, "cgroup.events"));
      return /^populated 1$/m.test(ev);
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) return false;
      throw err;
    }
  }

  /** SIGKILL to every process in it and its children, at once. */
  async kill(): Promise<void> {
    try {
      await Deno.writeTextFile(join(this.path, "cgroup.kill"), "1");
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
    }
  }

  /**
   * Kills everything in it, waits (up to `timeoutMs`) until it is empty, and removes it with
   * any child cgroups a task made. Returns how many processes it held. Throws when it cannot
   * be emptied or removed.
   */
  async destroy(timeoutMs = 5000): Promise<number> {
    if (!this.exists()) return 0;
    const held = (await this.pids()).length;
    if (await this.populated()) {
      await this.kill();
      await waitFor(async () => !(await this.populated()), {
        timeoutMs,
        intervalMs: 10,
        what: `the processes of ${this.path} to die`,
      });
    }
    await removeTree(this.path);
    return held;
  }
}

/**
 * The task cgroups under `parent` that an agent which is no longer running left behind: a
 * removal that failed (a process stuck in uninterruptible sleep past `destroy`'s wait), or a
 * crash whose journal was lost. Their name carries the agent's pid (`pathFor`); a cgroup whose
 * pid `isAlive` says runs (by default: this process, or any live process: another agent sharing
 * the parent, or the pid reused) is left alone, so a sweep never kills a task a running agent
 * owns.
 */
export async function leftoverTaskCgroups(
  parent: string,
  isAlive: (pid: number) => boolean = (pid) =>
    pid === Deno.pid || processStartTime(pid) !== undefined,
): Promise<TaskCgroup[]> {
  const found: TaskCgroup[] = [];
  let entries: Deno.DirEntry[];
  try {
    entries = await Array.fromAsync(Deno.readDir(parent));
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return [];
    throw err;
  }
  for (const e of entries) {
    const n = parseTaskCgroupName(e.name);
    if (!e.isDirectory || !n) continue;
    if (isAlive(n.agentPid)) continue;
    const cg = new TaskCgroup(join(parent, e.name));
    // The pid in the name means something only in the namespace of the agent that made it: a
    // cgroup holding a process of another pid namespace (a container's agent sharing the parent)
    // may belong to a live agent this one cannot see, so it is left alone.
    if (await holdsForeignPidNamespace(cg)) continue;
    found.push(cg);
  }
  return found;
}

/**
 * Whether a process in the cgroup lives in another pid namespace than this process: cgroup.procs
 * lists such a process as 0 when it is outside ours, and /proc shows a different ns/pid link when
 * it is in a namespace below ours.
 */
async function holdsForeignPidNamespace(cg: TaskCgroup): Promise<boolean> {
  let own: string;
  try {
    own = await Deno.readLink("/proc/self/ns/pid");
  } catch {
    return false; // no namespaces to compare (not Linux /proc): nothing to tell apart
  }
  const walk = async (dir: string): Promise<boolean> => {
    for (const pid of await cgroupProcs(dir)) {
      if (pid === 0) return true;
      try {
        if (await Deno.readLink(`/proc/${pid}/ns/pid`) !== own) return true;
      } catch { /* gone meanwhile */ }
    }
    // Sub-cgroups a task made: `destroy` would kill what is in them too.
    try {
      for await (const e of Deno.readDir(dir)) {
        if (e.isDirectory && await walk(join(dir, e.name))) return true;
      }
    } catch { /* gone meanwhile */ }
    return false;
  };
  return await walk(cg.path);
}

/** The pids in one cgroup (not in its children); none when it is gone. */
async function cgroupProcs(dir: string): Promise<number[]> {
  try {
    return (await Deno.readTextFile(join(dir, "cgroup.procs"))).split("\n").filter((l) => l !== "")
      .map(Number);
  } catch {
    return [];
  }
}

/** rmdir of a cgroup and its children, deepest first (cgroups are removed with rmdir). */
async function removeTree(dir: string): Promise<void> {
  let entries: Deno.DirEntry[];
  try {
    entries = await Array.fromAsync(Deno.readDir(dir));
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return;
    throw err;
  }
  for (const e of entries) {
    if (e.isDirectory) await removeTree(join(dir, e.name));
  }
  try {
    await Deno.remove(dir);
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
}
