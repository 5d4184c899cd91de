/**
 * The durable record of the tasks this agent is running, so that a crash of the agent leaves
 * no task behind, and no claimed task without a report: `<stateDir>/running/<taskId>.json`,
 * written BEFORE a task's id is claimed (task_ids.ts), updated with the process (pid, kernel start
 * time, process group) once it is spawned, and removed once its final report (a refusal too) is
 * on disk in the durable outbound queue. A cancel that comes before its task is journaled the
 * same way (`cancel`).
 *
 * On the next start, `interrupted()` lists what a crash left. `killInterrupted` kills each
 * record's cgroup (task_cgroup.ts: everything the task started, in whatever session), or,
 * for a task that ran without one, stops its process group, but only after checking that the
 * pid still is the process that was started (its start time in /proc), so a reused pid is never
 * signalled.
 */
import { join } from "node:path";
import { parseProcStat, processStartTime, waitFor } from "../process/mod.ts";
import { isDurableTemp, removeDurable, writeFileDurable } from "./durable.ts";
import { isTaskCgroupPath, TaskCgroup } from "./task_cgroup.ts";

export interface RunningTask {
  taskId: string;
  claimedAt: string;
  /** The task's `createdAt` (a cancel's `ts`): its id is claimed again from it by `recover`. */
  createdAt?: string;
  /** Set for a cancel that came before its task: `recover` reports it `cancelled` with this. */
  cancel?: string;
  /** Set once spawned. The task leads its own process group and session: pgid = pid. */
  pid?: number;
  /** Clock ticks since boot (field 22 of /proc/PID/stat). */
  startTime?: number;
  pgid?: number;
  /** The task's cgroup (task_cgroup.ts), written before it is made: it may not exist. */
  cgroup?: string;
}

export type Logger = (event: string, fields: Record<string, unknown>) => void;

export class TaskJournal {
  readonly dir: string;
  constructor(stateDir: string, private readonly log?: Logger) {
    this.dir = join(stateDir, "running");
  }

  private file(taskId: string) {
    return join(this.dir, `${taskId}.json`);
  }

  async write(rec: RunningTask): Promise<void> {
    await writeFileDurable(this.file(rec.taskId), JSON.stringify(rec) + "\n");
  }

  async end(taskId: string): Promise<void> {
    await removeDurable(this.file(taskId));
  }

  /** The records a previous run left (unreadable ones are logged and removed). */
  async interrupted(): Promise<RunningTask[]> {
    const out: RunningTask[] = [];
    let entries: Deno.DirEntry[] = [];
    try {
      entries = await Array.fromAsync(Deno.readDir(this.dir));
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) return [];
      throw err;
    }
    for (const e of entries) {
      const path = join(this.dir, e.name);
      if (isDurableTemp(e.name)) {
        await Deno.remove(path).catch(() => {});
        continue;
      }
      if (!e.name.endsWith(".json")) continue;
      try {
        const rec = JSON.parse(await Deno.readTextFile(path));
        if (typeof rec?.taskId !== "string" || `${rec.taskId}.json` !== e.name) {
          throw new Error("no taskId matching the file name");
        }
        out.push(rec as RunningTask);
      } catch (err) {
        this.log?.("running_task.corrupt", { file: path, error: (err as Error).message });
        await Deno.remove(path).catch(() => {});
      }
    }
    return out.sort((a, b) => a.claimedAt.localeCompare(b.claimedAt));
  }
}

/** What /proc/PID/stat says of a live process (undefined when gone or a zombie). */
export function procStat(
  pid: number,
): { pgrp: number; session: number; startTime: number } | undefined {
  try {
    const st = parseProcStat(Deno.readTextFileSync(`/proc/${pid}/stat`));
    if (!st || st.state === "Z" || st.state === "X") return undefined;
    return { pgrp: st.pgrp, session: st.session, startTime: st.startTime };
  } catch {
    return undefined;
  }
}

/**
 * The live processes of a task's group: the leader when it is still the process we started,
 * else (leader gone) the members of its group and session started no earlier than it. A pid is
 * never reused while its group exists, so a reused leader pid means the group is gone.
 */
export function taskProcesses(rec: RunningTask): number[] {
  if (rec.pid === undefined || rec.startTime === undefined) return [];
  const pgid = rec.pgid ?? rec.pid;
  const leader = processStartTime(rec.pid);
  if (leader !== undefined && leader !== rec.startTime) return []; // pid reused: not ours
  const members: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    const pid = Number(e.name);
    const st = procStat(pid);
    if (!st || st.pgrp !== pgid || st.session !== pgid) continue;
    if (st.startTime < rec.startTime) continue;
    members.push(pid);
  }
  return members;
}

/**
 * Stops what is left of an interrupted task: SIGTERM to its group, SIGKILL after `graceMs`.
 * Returns how many processes were found.
 */
export async function killInterrupted(rec: RunningTask, graceMs: number): Promise<number> {
  if (rec.cgroup !== undefined && isTaskCgroupPath(rec.cgroup)) {
    // Its cgroup holds all of it, whatever session or group it moved to: SIGKILL at once (the
    // agent that could have given it a grace is gone).
    return await new TaskCgroup(rec.cgroup).destroy(Math.max(graceMs, 5000));
  }
  const found = taskProcesses(rec);
  if (found.length === 0) return 0;
  const pgid = rec.pgid ?? rec.pid!;
  const signal = (sig: Deno.Signal) => {
    const alive = taskProcesses(rec);
    if (alive.length === 0) return false;
    if (alive.includes(rec.pid!)) {
      try {
        Deno.kill(-pgid, sig); // the leader is ours, checked just above: the whole group
        return true;
      } catch { /* gone in between */ }
    }
    for (const pid of alive) {
      try {
        Deno.kill(pid, sig);
      } catch { /* gone */ }
    }
    return true;
  };
  signal("SIGTERM");
  const gone = () => taskProcesses(rec).length === 0;
  const stopped = await waitFor(gone, { timeoutMs: graceMs, intervalMs: 25 }).then(
    () => true,
    () => false,
  );
  if (!stopped) {
    signal("SIGKILL");
    await waitFor(gone, { timeoutMs: 5000, intervalMs: 25 }).catch(() => {});
  }
  return found.length;
}
