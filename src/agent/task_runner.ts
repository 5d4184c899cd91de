/**
 * Runs tasks sent by the fleet server. A task is an argv, never a shell line: `["echo",
 * "$HOME"]` prints `$HOME`. The runner reports every step through `report` (accepted, running,
 * then done / failed / refused / cancelled), keeps only the last bytes of stdout and stderr
 * (bounded so the final report always fits a message, see task_status.ts), enforces the timeout
 * (SIGTERM to the task's process group, then SIGKILL to all of it after a grace), and runs each
 * task id at most once, even across agent restarts (task_ids.ts: the id is durable before the
 * task starts, and kept for the whole replay window).
 *
 * Before anything runs (task_sandbox.ts): the executable is resolved with the AGENT's PATH and
 * checked against `tasks.allow`; the task's environment may set only the names of
 * `tasks.allowEnv`; at most `maxConcurrent` tasks run at once (more are refused); once `stopAll`
 * (or `refuseNew`) began, every new task is refused. A task starts under `prlimit` (CPU time,
 * data memory, open files, processes) and `setpriv` (the task user when configured, no groups,
 * no capabilities, no_new_privs).
 *
 * Nothing a task starts outlives it (task_cgroup.ts): each task runs in a cgroup v2 of its own
 * when the agent can make one, entered before the task runs. The task ends when its process has
 * exited and its output is closed, or at its timeout (a process it started that holds the output
 * holds the task only that long); then everything left in the cgroup is killed (`cgroup.kill`)
 * and the cgroup removed. Its process gets SIGKILL when the agent dies (PR_SET_PDEATHSIG, set by
 * `setpriv`), and the running tasks (with their cgroups) are kept in a durable journal
 * (task_journal.ts) so the next start kills what a crash left and reports those tasks `failed:
 * agent restarted`. Without containment (see `detectContainment`: the agent logs why), stops
 * reach the task's process group only.
 *
 * Authenticity (signature, signer, robot, expiry, window) is checked before a task reaches the
 * runner (src/mqtt/signed.ts `checkDown`, in agent.ts).
 */
import { basename } from "node:path";
import type { TaskMessage } from "../mqtt/messages.ts";
import {
  DEFAULT_CLOCK_SKEW_SECONDS,
  type DownCheckOptions,
  MAX_TASK_TTL_SECONDS,
} from "../mqtt/signed.ts";
import { processStartTime } from "../process/mod.ts";
import { killInterrupted, type RunningTask, TaskJournal } from "./task_journal.ts";
import { DEFAULT_MAX_TASK_IDS, TaskIdStore } from "./task_ids.ts";
import {
  agentPath,
  CGROUP_EXIT,
  CGROUP_STEP_ERROR,
  checkTaskEnv,
  DEFAULT_ALLOW_ENV,
  describeAllowList,
  isAllowed,
  minimalEnv,
  PRLIMIT,
  resolveExecutable,
  sandboxArgv,
  SETPRIV,
  SH,
  type TaskLimits,
} from "./task_sandbox.ts";
import {
  type Containment,
  detectContainment,
  leftoverTaskCgroups,
  parseTaskCgroupName,
  TaskCgroup,
} from "./task_cgroup.ts";
import { canDropBoundingSet, type TaskUser } from "./task_user.ts";
import { boundError, type RawOutput, type TaskReport, withOutput } from "./task_status.ts";

export type { TaskReport } from "./task_status.ts";

/** What the runner needs of a task message. */
export type TaskSpec =
  & Pick<TaskMessage, "id" | "command" | "env" | "cwd" | "timeoutSeconds">
  & Partial<Pick<TaskMessage, "createdAt">>;

/**
 * Receives every report. The runner waits for the promise of a FINAL report (done, failed,
 * refused, cancelled) before it forgets the task, so a reporter that queues durably makes
 * results survive a crash. What it resolves to:
 * - `false` (or a throw): the report was not taken: the task stays in the journal, and the next
 *   start reports it (`failed: agent restarted`);
 * - `{ durable: Promise<boolean> }`: taken, but not durable yet (its write failed and is being
 *   retried): the task stays in the journal until `durable` resolves true;
 * - anything else: taken durably: the task leaves the journal.
 */
export type Reporter = (r: TaskReport) => unknown;

/** How a reporter took a report (see `Reporter`). */
type Taken = boolean | { durable: Promise<boolean> };

/** Limits when none are configured (the agent passes its config's). */
export const DEFAULT_LIMITS: TaskLimits = {
  cpuSeconds: 3600,
  memoryBytes: 1024 * 1024 * 1024,
  openFiles: 1024,
  processes: 256,
};

export interface TaskRunnerOptions {
  /** `["*"]` = everything; otherwise names (resolved with the agent's PATH) or absolute paths. */
  allow: string[];
  /** Where `task-ids.log` and the `running/` journal are kept. */
  stateDir: string;
  /** Working directory when a task names none. */
  defaultCwd: string;
  /** Between SIGTERM and SIGKILL. */
  killGraceMs: number;
  /** Bytes of stdout / stderr kept (the tail; the report may keep less, see task_status.ts). */
  maxOutputBytes?: number;
  /** Bound on task ids remembered within the window (claims beyond it are refused). */
  maxRememberedIds?: number;
  /**
   * The replay window (see `replayWindowEnd`): ids are kept for the one in force, measured from
   * their own createdAt, also those claimed under a shorter one.
   */
  window?: { clockSkewSeconds?: number; maxAgeSeconds?: number };
  /** Environment every task starts from (default `minimalEnv`; the agent's is NOT inherited). */
  baseEnv?: Record<string, string>;
  /** The PATH executables are resolved with (default: the agent's own, `agentPath()`). */
  path?: string;
  /** Run tasks as this user (resolved by `resolveTaskUser`); unset: as the agent. */
  user?: TaskUser;
  /** Variables a task may set (`tasks.allowEnv`; default `DEFAULT_ALLOW_ENV`). */
  allowEnv?: readonly string[];
  /** How tasks are contained (default: `detectContainment()`, a cgroup each when possible). */
  containment?: Containment;
  /** Empty the tasks' bounding set (default: when the agent holds CAP_SETPCAP). */
  dropBoundingSet?: boolean;
  limits?: TaskLimits;
  /** Tasks at once; more are refused. Default 4. */
  maxConcurrent?: number;
  /** When it returns a reason, new tasks are refused with it (e.g. the outbound queue is full). */
  refuseReason?: () => string | undefined;
  /** Wall clock in ms (tests). */
  clock?: () => number;
  log?: (event: string, fields: Record<string, unknown>) => void;
}

/**
 * The outcome of `handle`: ran (or was refused or failed: a report was made), a copy of a task
 * this runner is handling right now (nothing reported), or an id seen before (nothing run,
 * nothing reported: the caller answers).
 */
export type HandleOutcome = "run" | "duplicate" | "replay";

/** What `cancel` found. */
export type CancelOutcome =
  /** Running (stopped now) or about to start (will not): a `cancelled` report follows. */
  | "cancelling"
  /** Never seen: the id is claimed, so the task will not run if it comes; reported `cancelled`. */
  | "cancelled-before-arrival"
  /** Seen and finished (or already cancelled): nothing to do, nothing reported. */
  | "not-running";

/** True when util-linux `setpriv` and `prlimit` (and /bin/sh) are where the runner runs them. */
export function sandboxToolsMissing(): string[] {
  return [SETPRIV, PRLIMIT, SH].filter((p) => {
    try {
      return !Deno.statSync(p).isFile;
    } catch {
      return true;
    }
  });
}

/** The last `max` bytes of a stream, and how many bytes it carried. */
class TailBuffer {
  private chunks: Uint8Array[] = [];
  private size = 0;
  total = 0;
  constructor(private readonly max: number) {}
  push(chunk: Uint8Array) {
    this.total += chunk.byteLength;
    this.chunks.push(chunk);
    this.size += chunk.byteLength;
    while (this.size - this.chunks[0].byteLength >= this.max) {
      this.size -= this.chunks.shift()!.byteLength;
    }
  }
  raw(): RawOutput {
    const all = new Uint8Array(this.size);
    let off = 0;
    for (const c of this.chunks) {
      all.set(c, off);
      off += c.byteLength;
    }
    const bytes = all.byteLength > this.max ? all.subarray(all.byteLength - this.max) : all;
    return { bytes, total: this.total };
  }
}

interface Active {
  /** Set by a cancel (or a stop) that came before the process was started. */
  pending?: { why: string; cancelled: boolean };
  /** Once started: stops the task (SIGTERM, then SIGKILL). */
  stop?: (why: string, cancelled: boolean) => void;
  /** The whole handling, claim to final report. */
  handling?: Promise<unknown>;
}

function cancelledBeforeArrival(taskId: string, why: string): TaskReport {
  return { taskId, state: "cancelled", error: `${why} (before the task arrived; it will not run)` };
}

function stopActive(a: Active, why: string, cancelled: boolean): void {
  if (a.stop) a.stop(why, cancelled);
  else a.pending ??= { why, cancelled };
}

export class TaskRunner {
  readonly ids: TaskIdStore;
  readonly journal: TaskJournal;
  /** Every task this runner is handling: claimed, checked, running, reporting. */
  private readonly active = new Map<string, Active>();
  /** The latest claim of each id being claimed now (claims of one id take turns). */
  private readonly claiming = new Map<string, Promise<void>>();
  /** Tasks past every check (accepted) and not finished: what maxConcurrent bounds. */
  private started = 0;
  private readonly maxOut: number;
  private readonly path: string;
  private readonly limits: TaskLimits;
  readonly containment: Containment;
  private readonly dropBoundingSet: boolean;
  /** Set by `stopAll`: every task that comes after it is refused. */
  private stopping?: string;
  /** The leftover cgroups' sweep that `recover` started (`stopAll` waits for it). */
  private sweeping?: Promise<void>;

  constructor(private readonly opts: TaskRunnerOptions) {
    this.ids = new TaskIdStore({
      stateDir: opts.stateDir,
      // The window in force now: ids are kept for it, measured from their own createdAt.
      windowMs: ((opts.window?.maxAgeSeconds ?? MAX_TASK_TTL_SECONDS) +
        (opts.window?.clockSkewSeconds ?? DEFAULT_CLOCK_SKEW_SECONDS)) * 1000,
      maxIds: opts.maxRememberedIds ?? DEFAULT_MAX_TASK_IDS,
      log: opts.log,
      clock: opts.clock,
    });
    this.journal = new TaskJournal(opts.stateDir, opts.log);
    this.maxOut = opts.maxOutputBytes ?? 64 * 1024;
    this.path = opts.path ?? agentPath();
    this.limits = opts.limits ?? DEFAULT_LIMITS;
    // Probed only when tasks may run (the probe makes and removes a cgroup).
    this.containment = opts.containment ??
      (opts.allow.length > 0
        ? detectContainment()
        : { kind: "none", reason: "tasks.allow is empty: no task runs", hint: "" });
    this.dropBoundingSet = opts.dropBoundingSet ?? canDropBoundingSet();
  }

  get runningCount(): number {
    return this.started;
  }

  /**
   * The time rules of `checkDown` for a message arriving now: the clock, the window, and what
   * the id store can vouch for (a message created no later than the newest window start it has
   * forgotten is refused as a replay).
   */
  timeRules(): Pick<
    DownCheckOptions,
    "now" | "forgottenUpTo" | "clockSkewSeconds" | "maxAgeSeconds"
  > {
    return {
      now: new Date((this.opts.clock ?? Date.now)()),
      forgottenUpTo: this.ids.forgotten,
      clockSkewSeconds: this.opts.window?.clockSkewSeconds,
      maxAgeSeconds: this.opts.window?.maxAgeSeconds,
    };
  }

  /**
   * Sends a report: true when taken durably, false when the reporter refused it or threw
   * (logged, never thrown), `{ durable }` when it was taken but is not durable yet.
   */
  private async send(report: Reporter, r: TaskReport): Promise<Taken> {
    if (r.error !== undefined) r = { ...r, error: boundError(r.error) };
    try {
      const answer = await report(r);
      if (answer === false) return false;
      const later = (answer as { durable?: unknown } | undefined)?.durable;
      if (!(later instanceof Promise)) return true;
      return { durable: later.then((ok) => ok === true, () => false) };
    } catch (err) {
      this.opts.log?.("task.report_failed", { task: r.taskId, error: (err as Error).message });
      return false;
    }
  }

  /** The final report, then the task leaves the journal once the report is durable. */
  private async finish(report: Reporter, r: TaskReport, journaled: boolean): Promise<void> {
    const taken = await this.send(report, r);
    if (!journaled) return;
    if (taken === false) {
      this.opts.log?.("task.report_kept_for_restart", { task: r.taskId, state: r.state });
      return;
    }
    if (taken !== true) {
      // Not on disk yet: until it is, a crash must still report the task at the next start.
      this.opts.log?.("task.report_not_durable", {
        task: r.taskId,
        state: r.state,
        note:
          "kept in memory, sent, and written again; the task stays in the running journal until its report is on disk",
      });
      taken.durable.then((ok) => {
        if (ok) return this.endJournal(r.taskId);
        this.opts.log?.("task.report_kept_for_restart", { task: r.taskId, state: r.state });
      });
      return;
    }
    await this.endJournal(r.taskId);
  }

  private endJournal(taskId: string): Promise<void> {
    return this.journal.end(taskId).catch((err) =>
      this.opts.log?.("running_task.remove_failed", {
        task: taskId,
        error: (err as Error).message,
      })
    );
  }

  /** Where the replay window of `task`'s id starts: its createdAt (a cancel's ts), in ms. */
  private windowStart(task: Pick<TaskSpec, "createdAt">): number {
    const at = task.createdAt === undefined ? NaN : Date.parse(task.createdAt);
    return Number.isFinite(at) ? at : (this.opts.clock ?? Date.now)();
  }

  /**
   * Handles one delivered (and already authenticated) task. Resolves when the task has finished
   * (or was refused) and its final report was handed over, or at once for a duplicate or a
   * replay. Never throws: every failure is a report.
   */
  async handle(task: TaskSpec, report: Reporter): Promise<HandleOutcome> {
    if (this.active.has(task.id)) {
      this.opts.log?.("task.duplicate", { task: task.id });
      return "duplicate";
    }
    const me: Active = {};
    this.active.set(task.id, me);
    const p = this.claimAndRun(task, report, me);
    me.handling = p.catch(() => {});
    try {
      return await p;
    } finally {
      this.active.delete(task.id);
    }
  }

  /**
   * Claims the id of a task (or of a cancel that came first), journal first: the running record
   * is written before the id, so a crash at any point after the claim leaves a record, and the
   * next start (`recover`) reports the task. An id remembered already is answered at once (no
   * write: a flood of copies costs nothing). Returns whether the id was claimed now, or the
   * error that kept it from being recorded (nothing is claimed, nothing may run). Claims of one
   * id (a task and its cancel) take turns, so each journal record belongs to one claim.
   */
  private claim(
    taskId: string,
    createdAt: string | undefined,
    cancel?: string,
  ): Promise<"claimed" | "seen" | { error: string }> {
    const before = this.claiming.get(taskId) ?? Promise.resolve();
    const p = before.then(() => this.claimNow(taskId, createdAt, cancel));
    const turn = p.then(() => {}, () => {});
    this.claiming.set(taskId, turn);
    turn.then(() => {
      if (this.claiming.get(taskId) === turn) this.claiming.delete(taskId);
    });
    return p;
  }

  private async claimNow(
    taskId: string,
    createdAt: string | undefined,
    cancel?: string,
  ): Promise<"claimed" | "seen" | { error: string }> {
    try {
      if (await this.ids.lookup(taskId)) return "seen";
    } catch (err) {
      return { error: `cannot record task id: ${(err as Error).message}` };
    }
    const rec: RunningTask = { taskId, claimedAt: new Date().toISOString() };
    if (createdAt !== undefined) rec.createdAt = createdAt;
    if (cancel !== undefined) rec.cancel = cancel;
    try {
      await this.journal.write(rec);
    } catch (err) {
      return { error: `cannot record the running task: ${(err as Error).message}` };
    }
    let first: boolean;
    try {
      first = await this.ids.claim(taskId, this.windowStart({ createdAt }), {
        cancelled: cancel !== undefined,
      });
    } catch (err) {
      // Without the id on disk we cannot promise at-most-once: refuse rather than risk a rerun.
      await this.endJournal(taskId);
      return { error: `cannot record task id: ${(err as Error).message}` };
    }
    if (first) return "claimed";
    await this.endJournal(taskId); // claimed meanwhile, outside the turns (the record is ours)
    return "seen";
  }

  private async claimAndRun(task: TaskSpec, report: Reporter, me: Active): Promise<HandleOutcome> {
    const claimed = await this.claim(task.id, task.createdAt);
    if (typeof claimed === "object") {
      await this.finish(report, { taskId: task.id, state: "refused", error: claimed.error }, false);
      return "run";
    }
    if (claimed === "seen") {
      this.opts.log?.("task.seen_before", { task: task.id });
      return "replay";
    }
    // From here on the task is in the journal: every final report below ends it.
    const refuse = (error: string) =>
      this.finish(report, { taskId: task.id, state: "refused", error }, true);
    if (this.stopping !== undefined) {
      await refuse(`${this.stopping}: no new task starts`);
      return "run";
    }
    const exe = task.command[0];
    if (this.opts.allow.length === 0) {
      await refuse("no task may run: tasks.allow is empty in the agent config");
      return "run";
    }
    const resolved = resolveExecutable(exe, this.path);
    if (!resolved.ok) {
      await refuse(resolved.error);
      return "run";
    }
    if (!isAllowed(this.opts.allow, resolved.path, this.path)) {
      // Where the agent's PATH found the programs stays on the robot (its log): the refusal
      // goes to everyone who may view the task.
      this.opts.log?.("task.refused_not_allowed", {
        task: task.id,
        executable: exe,
        resolved: resolved.path,
        allow: describeAllowList(this.opts.allow, this.path),
      });
      await refuse(
        `executable ${JSON.stringify(exe)} is not one tasks.allow permits (${
          this.opts.allow.join(", ")
        }; a name there permits only the program the agent's PATH finds for it)`,
      );
      return "run";
    }
    const envError = checkTaskEnv(task.env, this.opts.allowEnv ?? DEFAULT_ALLOW_ENV);
    if (envError) {
      await refuse(envError);
      return "run";
    }
    const max = this.opts.maxConcurrent ?? 4;
    if (this.started >= max) {
      await refuse(`busy: ${this.started} tasks running (tasks.maxConcurrent ${max})`);
      return "run";
    }
    const busy = this.opts.refuseReason?.();
    if (busy !== undefined) {
      await refuse(busy);
      return "run";
    }
    if (me.pending) {
      const { why, cancelled } = me.pending;
      await this.finish(
        report,
        cancelled
          ? { taskId: task.id, state: "cancelled", error: `${why} (before it started)` }
          : { taskId: task.id, state: "failed", error: `${why} (before it started)` },
        true,
      );
      return "run";
    }
    this.started++;
    try {
      this.send(report, { taskId: task.id, state: "accepted" });
      await this.execute(task, resolved.path, report, me);
    } finally {
      this.started--;
    }
    return "run";
  }

  /**
   * Cancels a task: a running one is stopped (SIGTERM to its group, SIGKILL after the grace)
   * and reported `cancelled`; one not started yet will not start. A task never seen has its id
   * claimed (marked cancelled) so that it will not run if it arrives later, and is reported
   * `cancelled` now. A task seen and finished is left alone.
   */
  async cancel(
    taskId: string,
    why: string,
    report: Reporter,
    /** The cancel's `ts`: its id is claimed for the window measured from it. */
    cancelTs: string,
  ): Promise<CancelOutcome> {
    const a = this.active.get(taskId);
    if (a) {
      stopActive(a, why, true);
      return "cancelling";
    }
    const claimed = await this.claim(taskId, cancelTs, why);
    if (typeof claimed === "object") {
      this.opts.log?.("task.cancel_unrecorded", { task: taskId, error: claimed.error });
      return "not-running";
    }
    if (claimed === "seen") {
      // It may have arrived while the claim was written: then it is active now.
      const again = this.active.get(taskId);
      if (again) {
        stopActive(again, why, true);
        return "cancelling";
      }
      return "not-running";
    }
    await this.finish(report, cancelledBeforeArrival(taskId, why), true);
    return "cancelled-before-arrival";
  }

  /**
   * From now on, every task that arrives is refused with `why` (its id claimed, so it never
   * runs later either). `stopAll` calls it; the agent calls it first thing when it stops.
   */
  refuseNew(why = "agent stopping"): void {
    this.stopping ??= why;
  }

  /** Refuses new tasks, stops every running task and waits for their final reports. */
  async stopAll(why = "agent stopping"): Promise<void> {
    this.refuseNew(why);
    const all = [...this.active.values()];
    for (const a of all) stopActive(a, why, false);
    await Promise.all([...all.map((a) => a.handling), this.sweeping]);
  }

  /**
   * After a crash: stops what is left of each task the journal still lists (checking each pid's
   * start time first), reports it `failed: agent restarted` (a cancel that came first:
   * `cancelled`), unless `hasFinal` says its final report is already queued, and clears the
   * journal. Every listed id is claimed (it may not have been when the crash came), so a copy
   * the server sends again is a replay and never runs. Returns the task ids.
   */
  async recover(report: Reporter, hasFinal: (taskId: string) => boolean = () => false) {
    const recs = await this.journal.interrupted();
    await Promise.all(recs.map(async (rec) => {
      await this.ids.claim(rec.taskId, this.windowStart({ createdAt: rec.createdAt }), {
        cancelled: rec.cancel !== undefined,
      }).catch((err) =>
        this.opts.log?.("task.interrupted_unclaimed", {
          task: rec.taskId,
          error: (err as Error).message,
        })
      );
      const killed = await killInterrupted(rec, this.opts.killGraceMs).catch((err) => {
        this.opts.log?.("task.interrupted_kill_failed", {
          task: rec.taskId,
          error: (err as Error).message,
        });
        return 0;
      });
      const queued = hasFinal(rec.taskId);
      this.opts.log?.("task.interrupted", {
        task: rec.taskId,
        pid: rec.pid,
        killed,
        finalQueued: queued,
      });
      if (queued) await this.journal.end(rec.taskId).catch(() => {});
      else {
        await this.finish(
          report,
          rec.cancel !== undefined
            ? cancelledBeforeArrival(rec.taskId, rec.cancel)
            : { taskId: rec.taskId, state: "failed", error: "agent restarted" },
          true,
        );
      }
    }));
    // In the background: a leftover that cannot be emptied (a process in uninterruptible
    // sleep) would otherwise hold the agent's start (and its connection) for destroy's whole
    // wait; the cgroups recover just tried are not waited for again in this start.
    const tried = new Set(recs.flatMap((r) => r.cgroup !== undefined ? [r.cgroup] : []));
    this.sweeping = this.sweepCgroups(tried);
    return recs.map((r) => r.taskId);
  }

  /**
   * Removes the task cgroups a previous run of this agent left (see `leftoverTaskCgroups`):
   * what the journal no longer lists, e.g. a cgroup whose removal failed when its task ended.
   * Only tasks this agent claimed (its task-id store knows them): another agent sharing the
   * parent cleans up its own at its own restart, and reports them. One that still cannot be
   * removed is logged and tried again at the next start.
   */
  private async sweepCgroups(skip: ReadonlySet<string>): Promise<void> {
    if (this.containment.kind !== "cgroup") return;
    let left: TaskCgroup[];
    try {
      // This process's own pid counts as alive: a test harness runs several agents in one
      // process, and a container's restarted agent gets a fresh cgroup from its runtime.
      left = await leftoverTaskCgroups(this.containment.parent);
    } catch (err) {
      this.opts.log?.("task.cgroup_sweep_failed", {
        parent: this.containment.parent,
        error: (err as Error).message,
      });
      return;
    }
    await Promise.all(
      left.filter((cg) => !skip.has(cg.path)).map(async (cg) => {
        const name = parseTaskCgroupName(basename(cg.path));
        if (!name || !(await this.ids.lookup(name.taskId).catch(() => undefined))) return;
        try {
          const killed = await cg.destroy();
          this.opts.log?.("task.cgroup_left_removed", { cgroup: cg.path, killed });
        } catch (err) {
          this.opts.log?.("task.cgroup_remove_failed", {
            cgroup: cg.path,
            error: (err as Error).message,
            note: "tried again at the next start",
          });
        }
      }),
    );
  }

  private async execute(
    task: TaskSpec,
    exe: string,
    report: Reporter,
    me: Active,
  ): Promise<void> {
    const args = task.command.slice(1);
    const fail = (error: string) =>
      this.finish(report, { taskId: task.id, state: "failed", error }, true);
    const cwd = task.cwd ?? this.opts.defaultCwd;
    try {
      if (!(await Deno.stat(cwd)).isDirectory) throw new Error("not a directory");
    } catch (err) {
      await fail(
        `working directory ${cwd}: ${
          err instanceof Deno.errors.NotFound ? "does not exist" : (err as Error).message
        }`,
      );
      return;
    }
    const user = this.opts.user;
    const env = {
      ...(this.opts.baseEnv ?? minimalEnv({ path: this.path, user })),
      ...task.env,
    };
    const deadline = Date.now() + task.timeoutSeconds * 1000;
    // Its cgroup: journaled first (a crash right after leaves a name that is not there, or an
    // empty cgroup the next start removes), then made.
    let cg: TaskCgroup | undefined;
    if (this.containment.kind === "cgroup") {
      const path = TaskCgroup.pathFor(this.containment.parent, task.id);
      try {
        await this.journal.write({
          taskId: task.id,
          claimedAt: new Date().toISOString(),
          cgroup: path,
        });
        cg = await TaskCgroup.create(path);
      } catch (err) {
        await fail(`cannot contain the task: cgroup ${path}: ${(err as Error).message}`);
        return;
      }
    }
    const argv = sandboxArgv({
      exe,
      args,
      limits: this.limits,
      user,
      dropBoundingSet: this.dropBoundingSet,
      cgroupProcs: cg?.procsFile,
    });
    let child: Deno.ChildProcess;
    try {
      // (sh moves itself into the cgroup and execs) prlimit, which sets the rlimits and execs
      // setpriv, which switches user, drops capabilities, sets no_new_privs and
      // PR_SET_PDEATHSIG, and execs the task: one pid all along, so the task gets SIGKILL if
      // the agent dies, even by kill -9.
      child = new Deno.Command(argv.cmd, {
        args: argv.args,
        cwd,
        clearEnv: true,
        env,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        // Its own process group (and session), so a stop also reaches what the task started.
        detached: true,
      }).spawn();
    } catch (err) {
      await this.removeCgroup(task.id, cg);
      await fail(
        err instanceof Deno.errors.NotFound
          ? `cannot start ${exe}: ${argv.cmd} not found (util-linux)`
          : `cannot start ${exe}: ${(err as Error).message}`,
      );
      return;
    }
    const pid = child.pid;
    const startTime = processStartTime(pid);
    if (startTime !== undefined) {
      await this.journal.write({
        taskId: task.id,
        claimedAt: new Date().toISOString(),
        ...(task.createdAt !== undefined ? { createdAt: task.createdAt } : {}),
        pid,
        startTime,
        pgid: pid,
        ...(cg ? { cgroup: cg.path } : {}),
      }).catch((err) =>
        this.opts.log?.("running_task.write_failed", {
          task: task.id,
          error: (err as Error).message,
        })
      );
    }
    this.opts.log?.("task.running", {
      task: task.id,
      pid,
      exe,
      uid: user?.uid,
      contained: cg !== undefined,
    });
    this.send(report, { taskId: task.id, state: "running" });

    const out = new TailBuffer(this.maxOut);
    const err = new TailBuffer(this.maxOut);
    const readers: ReadableStreamDefaultReader<Uint8Array>[] = [];
    const pump = async (s: ReadableStream<Uint8Array>, b: TailBuffer) => {
      const reader = s.getReader();
      readers.push(reader);
      try {
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          b.push(value);
        }
      } catch { /* stream cancelled */ }
    };
    const pumps = Promise.all([pump(child.stdout, out), pump(child.stderr, err)]);

    let stopReason: string | undefined;
    let cancelled = false;
    /** The task's own process had ended when the stop came. */
    let stoppedAfterExit = false;
    let leaderDone = false;
    const signalGroup = (sig: Deno.Signal) => {
      try {
        Deno.kill(-pid, sig); // the whole process group
      } catch {
        if (leaderDone) return; // the pid is no longer ours to signal
        try {
          child.kill(sig);
        } catch { /* already gone */ }
      }
    };
    /** SIGKILL to everything of the task: its cgroup (all of it), else its process group. */
    const killAll = () => {
      if (cg) {
        cg.kill().catch((e) =>
          this.opts.log?.("task.cgroup_kill_failed", { task: task.id, error: e.message })
        );
      }
      signalGroup("SIGKILL");
    };
    let wake = () => {};
    const woken = new Promise<void>((resolve) => wake = resolve);
    let killTimer: ReturnType<typeof setTimeout> | undefined;
    const stop = (why: string, byCancel: boolean) => {
      if (stopReason !== undefined) return;
      stopReason = why;
      cancelled = byCancel;
      stoppedAfterExit = leaderDone;
      this.opts.log?.("task.stop", { task: task.id, why, cancel: byCancel });
      if (leaderDone) {
        // The task is gone; what it left holds its output: no grace for it.
        killAll();
      } else {
        signalGroup("SIGTERM");
        killTimer = setTimeout(killAll, this.opts.killGraceMs);
      }
      wake();
    };
    me.stop = stop;
    if (me.pending) stop(me.pending.why, me.pending.cancelled); // came while it was starting
    const timeoutTimer = setTimeout(
      () => stop(`timed out after ${task.timeoutSeconds}s`, false),
      Math.max(0, deadline - Date.now()),
    );
    const st = await child.status;
    leaderDone = true;
    clearTimeout(killTimer);
    // Stopped: what is left of it goes at once. Otherwise its output may still be open (a
    // process it started writes to it): wait for that, up to the timeout (or a cancel).
    if (stopReason !== undefined) killAll();
    const drained = await Promise.race([pumps.then(() => true), woken.then(() => false)]);
    clearTimeout(timeoutTimer);
    if (!drained) {
      // killAll ran (stop). A process outside the task's reach (no cgroup: it left the
      // process group) may keep the pipes open: stop reading after the grace.
      const closed = await Promise.race([
        pumps.then(() => true),
        new Promise<boolean>((r) => setTimeout(() => r(false), this.opts.killGraceMs)),
      ]);
      if (!closed) {
        this.opts.log?.("task.output_abandoned", {
          task: task.id,
          why: "a process the task started, outside its process group, holds its output",
        });
        for (const r of readers) r.cancel().catch(() => {});
        await pumps;
      }
    }
    // Nothing of the task outlives it: whatever is left (e.g. a daemon with its output closed).
    const leftovers = await this.removeCgroup(task.id, cg);
    if (!cg) signalGroup("SIGKILL");
    if (leftovers > 0) {
      this.opts.log?.("task.leftovers_killed", { task: task.id, processes: leftovers });
    }

    const exitCode = st.signal ? null : st.code;
    const ended = st.signal ? `killed by ${st.signal}` : `exited with ${st.code}`;
    const how = stoppedAfterExit
      ? `the task had ${ended}, but processes it started kept its output open; they were killed`
      : `stopped with ${st.signal ?? `exit ${st.code}`}${
        st.signal === "SIGKILL" ? ` (SIGTERM was ignored for ${this.opts.killGraceMs} ms)` : ""
      }`;
    const errTail = new TextDecoder().decode(err.raw().bytes.subarray(-512));
    const execFailed = !st.signal && (st.code === 126 || st.code === 127) &&
      /^setpriv: failed to execute .*$/m.exec(errTail)?.[0];
    const cgroupFailed = cg !== undefined && !st.signal && st.code === CGROUP_EXIT &&
      CGROUP_STEP_ERROR.exec(errTail)?.[0];
    let base: TaskReport;
    if (stopReason !== undefined && cancelled) {
      base = { taskId: task.id, state: "cancelled", exitCode, error: `${stopReason}; ${how}` };
    } else if (stopReason !== undefined) {
      base = { taskId: task.id, state: "failed", exitCode, error: `${stopReason}; ${how}` };
    } else if (execFailed || cgroupFailed) {
      base = {
        taskId: task.id,
        state: "failed",
        exitCode,
        error: `cannot start ${exe}: ${execFailed || cgroupFailed}`,
      };
    } else if (st.signal) {
      base = { taskId: task.id, state: "failed", exitCode: null, error: `killed by ${st.signal}` };
    } else {
      base = { taskId: task.id, state: "done", exitCode: st.code };
    }
    this.opts.log?.("task.finished", {
      task: task.id,
      state: base.state,
      exit: st.signal ?? st.code,
      stdoutBytes: out.total,
      stderrBytes: err.total,
    });
    await this.finish(report, withOutput(base, out.raw(), err.raw()), true);
  }

  /** Kills what is left in a task's cgroup and removes it; how many processes it held. */
  private async removeCgroup(taskId: string, cg: TaskCgroup | undefined): Promise<number> {
    if (!cg) return 0;
    try {
      return await cg.destroy();
    } catch (err) {
      this.opts.log?.("task.cgroup_remove_failed", {
        task: taskId,
        cgroup: cg.path,
        error: (err as Error).message,
      });
      return 0;
    }
  }
}
