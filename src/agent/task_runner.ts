/**
 * Runs tasks sent by the fleet server. A task is an argv, never a shell line: `["echo",
 * "$HOME"]` prints `$HOME`. The runner reports every step through `report` (accepted, running,
 * then done / failed / refused), keeps only the last bytes of stdout and stderr (bounded so the
 * final report always fits a message, see task_status.ts), enforces the timeout (SIGTERM to the
 * task's process group, SIGKILL after a grace), and runs each task id at most once, even across
 * agent restarts (ids are kept in a small file, durable before the task starts).
 *
 * Tasks do not outlive the agent: each task leads its own process group, its process gets
 * SIGKILL when the agent dies (PR_SET_PDEATHSIG, through util-linux `setpriv`), and the
 * running tasks are kept in a durable journal (task_journal.ts) so the next start stops what a
 * crash left and reports those tasks `failed: agent restarted`.
 */
import { isAbsolute, join, resolve } from "node:path";
import type { TaskMessage } from "../mqtt/messages.ts";
import { processStartTime } from "../process/mod.ts";
import { writeFileDurable } from "./durable.ts";
import { killInterrupted, TaskJournal } from "./task_journal.ts";
import { boundError, type RawOutput, type TaskReport, withOutput } from "./task_status.ts";

export type { TaskReport } from "./task_status.ts";

/** What the runner needs of a task message. */
export type TaskSpec = Pick<
  TaskMessage,
  "id" | "command" | "env" | "cwd" | "timeoutSeconds" | "expiresAt"
>;

/**
 * Receives every report. The runner waits for the promise of a FINAL report (done, failed,
 * refused) before it forgets the task, so a reporter that queues durably makes results survive
 * a crash. A reporter resolving `false` could not take the report: the task stays in the
 * journal, and the next start reports it.
 */
export type Reporter = (r: TaskReport) => unknown;

export interface TaskRunnerOptions {
  /** `["*"]` = everything; otherwise exact executable names or absolute paths. */
  allow: string[];
  /** Where `task-ids.json` and the `running/` journal are kept. */
  stateDir: string;
  /** Working directory when a task names none. */
  defaultCwd: string;
  /** Between SIGTERM and SIGKILL. */
  killGraceMs: number;
  /** Bytes of stdout / stderr kept (the tail; the report may keep less, see task_status.ts). */
  maxOutputBytes?: number;
  /** How many task ids are remembered. */
  maxRememberedIds?: number;
  /** Environment every task starts from (the agent's own env is NOT inherited). */
  baseEnv?: Record<string, string>;
  /** When it returns a reason, new tasks are refused with it (e.g. the outbound queue is full). */
  refuseReason?: () => string | undefined;
  log?: (event: string, fields: Record<string, unknown>) => void;
}

/** Decides whether argv[0] may run. */
export function isAllowed(allow: string[], executable: string): boolean {
  if (allow.includes("*")) return true;
  return allow.includes(executable);
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

/**
 * Remembers task ids already claimed (bounded). A claim resolves only once the id is on disk
 * (see `writeFileDurable`), so a task never starts before its id would survive a crash. Claims
 * made together share one write; writes never overlap.
 */
export class TaskIdStore {
  private ids: string[] = [];
  private set = new Set<string>();
  private loading?: Promise<void>;
  private writing: Promise<void> = Promise.resolve();
  /** Bumped by every claim; `written` is the version last on disk. */
  private version = 0;
  private written = 0;
  constructor(
    private readonly file: string,
    private readonly max = 1000,
    private readonly log?: (event: string, fields: Record<string, unknown>) => void,
  ) {}

  /** Reads the file once; every claim waits for the same read. A failed read is retried. */
  private load(): Promise<void> {
    this.loading ??= this.read().catch((err) => {
      this.loading = undefined;
      throw err;
    });
    return this.loading;
  }

  private async read() {
    let text: string;
    try {
      text = await Deno.readTextFile(this.file);
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) return;
      // Unreadable is not empty: refuse tasks rather than risk running one again.
      throw new Error(`cannot read ${this.file}: ${(err as Error).message}`);
    }
    try {
      const parsed = JSON.parse(text);
      if (!Array.isArray(parsed?.ids)) throw new Error("no ids array");
      this.ids = parsed.ids.filter((x: unknown) => typeof x === "string").slice(-this.max);
      this.set = new Set(this.ids);
    } catch (err) {
      // Only disk damage can do this (writes are atomic): say so, and start afresh.
      this.log?.("task_ids.corrupt", { file: this.file, error: (err as Error).message });
    }
  }

  /** True the first time an id is seen; false for a repeat. Resolves once it is durable. */
  async claim(id: string): Promise<boolean> {
    await this.load();
    if (this.set.has(id)) return false;
    // Kept in memory even when the write below fails: this process never runs it either way.
    this.ids.push(id);
    this.set.add(id);
    while (this.ids.length > this.max) this.set.delete(this.ids.shift()!);
    await this.persist(++this.version);
    return true;
  }

  private persist(version: number): Promise<void> {
    const p = this.writing.then(async () => {
      if (this.written >= version) return; // an earlier write already covered this claim
      const snapshot = this.version;
      await writeFileDurable(this.file, JSON.stringify({ ids: this.ids }) + "\n");
      this.written = snapshot;
    });
    this.writing = p.catch(() => {});
    return p;
  }
}

function defaultBaseEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const k of ["PATH", "HOME", "LANG", "TZ", "USER", "LOGNAME"]) {
    const v = Deno.env.get(k);
    if (v !== undefined) env[k] = v;
  }
  env["PATH"] ??= "/usr/local/bin:/usr/bin:/bin";
  return env;
}

const SETPRIV = "/usr/bin/setpriv";
let setprivAvailable: boolean | undefined;
function hasSetpriv(): boolean {
  if (setprivAvailable === undefined) {
    try {
      setprivAvailable = Deno.statSync(SETPRIV).isFile;
    } catch {
      setprivAvailable = false;
    }
  }
  return setprivAvailable;
}

/**
 * Finds the executable the way execvp will (PATH of the task's environment, or a path relative
 * to its cwd), for a precise error before spawning: with `setpriv` in front, a missing program
 * would otherwise only show as setpriv's exit code.
 */
function findExecutable(exe: string, cwd: string, path: string): string | undefined {
  const notFound = `executable not found: ${exe}${isAbsolute(exe) ? "" : " (searched PATH)"}`;
  const candidates = exe.includes("/")
    ? [resolve(cwd, exe)]
    : path.split(":").map((d) => join(resolve(cwd, d || "."), exe));
  let denied = false;
  for (const c of candidates) {
    try {
      const st = Deno.statSync(c);
      if (st.isFile && ((st.mode ?? 0o755) & 0o111) !== 0) return undefined;
      denied = true;
    } catch (err) {
      if (err instanceof Deno.errors.PermissionDenied) denied = true;
    }
  }
  return denied ? `executable not runnable (permission denied): ${exe}` : notFound;
}

export class TaskRunner {
  private readonly ids: TaskIdStore;
  readonly journal: TaskJournal;
  private readonly running = new Map<
    string,
    { cancel: (why: string) => void; done: Promise<void> }
  >();
  private readonly maxOut: number;

  constructor(private readonly opts: TaskRunnerOptions) {
    this.ids = new TaskIdStore(
      join(opts.stateDir, "task-ids.json"),
      opts.maxRememberedIds,
      opts.log,
    );
    this.journal = new TaskJournal(opts.stateDir, opts.log);
    this.maxOut = opts.maxOutputBytes ?? 64 * 1024;
  }

  get runningCount(): number {
    return this.running.size;
  }

  /** Sends a report; false when the reporter refused it or threw (logged, never thrown). */
  private async send(report: Reporter, r: TaskReport): Promise<boolean> {
    if (r.error !== undefined) r = { ...r, error: boundError(r.error) };
    try {
      return (await report(r)) !== false;
    } catch (err) {
      this.opts.log?.("task.report_failed", { task: r.taskId, error: (err as Error).message });
      return false;
    }
  }

  /** The final report, then the task leaves the journal (unless the report was not taken). */
  private async finish(report: Reporter, r: TaskReport, journaled: boolean): Promise<void> {
    const taken = await this.send(report, r);
    if (!journaled) return;
    if (!taken) {
      this.opts.log?.("task.report_kept_for_restart", { task: r.taskId, state: r.state });
      return;
    }
    await this.journal.end(r.taskId).catch((err) =>
      this.opts.log?.("running_task.remove_failed", {
        task: r.taskId,
        error: (err as Error).message,
      })
    );
  }

  /**
   * Handles one delivered task. Resolves when the task has finished (or was refused, or was a
   * duplicate) and its final report was handed over. Never throws: every failure is a report.
   */
  async handle(task: TaskSpec, report: Reporter): Promise<"run" | "duplicate"> {
    let first: boolean;
    try {
      first = await this.ids.claim(task.id);
    } catch (err) {
      // Without the id on disk we cannot promise at-most-once: refuse rather than risk a rerun.
      await this.finish(report, {
        taskId: task.id,
        state: "refused",
        error: `cannot record task id: ${(err as Error).message}`,
      }, false);
      return "run";
    }
    if (!first) {
      this.opts.log?.("task.duplicate", { task: task.id });
      return "duplicate";
    }
    const refuse = (error: string) =>
      this.finish(report, { taskId: task.id, state: "refused", error }, false);
    if (task.expiresAt !== undefined) {
      const at = new Date().toISOString();
      if (Date.parse(at) > Date.parse(task.expiresAt)) {
        await refuse(`expired: arrived at ${at}, after its expiresAt ${task.expiresAt}`);
        return "run";
      }
    }
    const exe = task.command[0];
    if (!isAllowed(this.opts.allow, exe)) {
      await refuse(
        this.opts.allow.length === 0
          ? `no task may run: tasks.allow is empty in the agent config`
          : `executable ${JSON.stringify(exe)} is not in tasks.allow`,
      );
      return "run";
    }
    const busy = this.opts.refuseReason?.();
    if (busy !== undefined) {
      await refuse(busy);
      return "run";
    }
    try {
      await this.journal.write({ taskId: task.id, claimedAt: new Date().toISOString() });
    } catch (err) {
      await refuse(`cannot record the running task: ${(err as Error).message}`);
      return "run";
    }
    this.send(report, { taskId: task.id, state: "accepted" });
    let cancel!: (why: string) => void;
    const cancelled = new Promise<string>((r) => (cancel = r));
    const done = this.execute(task, report, cancelled);
    this.running.set(task.id, { cancel, done });
    try {
      await done;
    } finally {
      this.running.delete(task.id);
    }
    return "run";
  }

  /** Cancels a running task (SIGTERM, then SIGKILL). False when it is not running. */
  cancel(taskId: string, why = "cancelled"): boolean {
    const r = this.running.get(taskId);
    if (!r) return false;
    r.cancel(why);
    return true;
  }

  /** Stops every running task and waits for their final reports. */
  async stopAll(why = "agent stopping"): Promise<void> {
    const all = [...this.running.values()];
    for (const r of all) r.cancel(why);
    await Promise.all(all.map((r) => r.done.catch(() => {})));
  }

  /**
   * After a crash: stops what is left of each task the journal still lists (checking each pid's
   * start time first), reports it `failed: agent restarted` (unless `hasFinal` says its final
   * report is already queued), and clears the journal. Returns the task ids.
   */
  async recover(report: Reporter, hasFinal: (taskId: string) => boolean = () => false) {
    const recs = await this.journal.interrupted();
    await Promise.all(recs.map(async (rec) => {
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
          { taskId: rec.taskId, state: "failed", error: "agent restarted" },
          true,
        );
      }
    }));
    return recs.map((r) => r.taskId);
  }

  private async execute(
    task: TaskSpec,
    report: Reporter,
    cancelled: Promise<string>,
  ): Promise<void> {
    const [exe, ...args] = task.command;
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
    const env = { ...(this.opts.baseEnv ?? defaultBaseEnv()), ...task.env };
    const wrap = hasSetpriv();
    if (wrap) {
      const missing = findExecutable(exe, cwd, env["PATH"] ?? "");
      if (missing) {
        await fail(missing);
        return;
      }
    }
    let child: Deno.ChildProcess;
    try {
      // setpriv sets PR_SET_PDEATHSIG and execs the task (same pid): the task gets SIGKILL if
      // the agent dies, even by kill -9. Without setpriv, the journal still cleans up at start.
      child = new Deno.Command(wrap ? SETPRIV : exe, {
        args: wrap ? ["--pdeathsig", "KILL", "--", exe, ...args] : args,
        cwd,
        clearEnv: true,
        env,
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        // Its own process group (and session), so a timeout also stops what the task started.
        detached: true,
      }).spawn();
    } catch (err) {
      await fail(
        err instanceof Deno.errors.NotFound
          ? `executable not found: ${exe}${isAbsolute(exe) ? "" : " (searched PATH)"}`
          : err instanceof Deno.errors.PermissionDenied
          ? `executable not runnable (permission denied): ${exe}`
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
        pid,
        startTime,
        pgid: pid,
      }).catch((err) =>
        this.opts.log?.("running_task.write_failed", {
          task: task.id,
          error: (err as Error).message,
        })
      );
    }
    this.opts.log?.("task.running", { task: task.id, pid, exe });
    this.send(report, { taskId: task.id, state: "running" });

    const out = new TailBuffer(this.maxOut);
    const err = new TailBuffer(this.maxOut);
    const pump = async (s: ReadableStream<Uint8Array>, b: TailBuffer) => {
      try {
        for await (const chunk of s) b.push(chunk);
      } catch { /* stream cancelled */ }
    };
    const pumps = Promise.all([pump(child.stdout, out), pump(child.stderr, err)]);

    let stopReason: string | undefined;
    const signalGroup = (sig: Deno.Signal) => {
      try {
        Deno.kill(-pid, sig); // the whole process group
      } catch {
        try {
          child.kill(sig);
        } catch { /* already gone */ }
      }
    };
    let killTimer: ReturnType<typeof setTimeout> | undefined;
    const stop = (why: string) => {
      if (stopReason !== undefined) return;
      stopReason = why;
      this.opts.log?.("task.stop", { task: task.id, why });
      signalGroup("SIGTERM");
      killTimer = setTimeout(() => signalGroup("SIGKILL"), this.opts.killGraceMs);
    };
    const timeoutTimer = setTimeout(
      () => stop(`timed out after ${task.timeoutSeconds}s`),
      task.timeoutSeconds * 1000,
    );
    const status = child.status;
    let settled = false;
    cancelled.then((why) => {
      if (!settled) stop(why);
    });
    const st = await status;
    settled = true;
    clearTimeout(timeoutTimer);
    // Leftover processes in the group would keep the pipes open: stop them too.
    signalGroup("SIGKILL");
    clearTimeout(killTimer);
    await pumps;

    const exitCode = st.signal ? null : st.code;
    let base: TaskReport;
    if (stopReason !== undefined) {
      base = {
        taskId: task.id,
        state: "failed",
        exitCode,
        error: `${stopReason}; stopped with ${st.signal ?? `exit ${st.code}`}${
          st.signal === "SIGKILL" ? ` (SIGTERM was ignored for ${this.opts.killGraceMs} ms)` : ""
        }`,
      };
    } else if (st.signal) {
      base = { taskId: task.id, state: "failed", exitCode: null, error: `killed by ${st.signal}` };
    } else {
      base = { taskId: task.id, state: "done", exitCode: st.code };
    }
    this.opts.log?.("task.finished", {
      task: task.id,
      exit: st.signal ?? st.code,
      stdoutBytes: out.total,
      stderrBytes: err.total,
    });
    await this.finish(report, withOutput(base, out.raw(), err.raw()), true);
  }
}
