/**
 * Runs tasks sent by the fleet server. A task is an argv, never a shell line: `["echo",
 * "$HOME"]` prints `$HOME`. The runner reports every step through `report` (accepted, running,
 * then done / failed / refused), keeps only the last bytes of stdout and stderr, enforces the
 * timeout (SIGTERM to the task's process group, SIGKILL after a grace), and runs each task id
 * at most once, even across agent restarts (ids are kept in a small file).
 */
import { isAbsolute, join } from "node:path";
import {
  type Envelope,
  MAX_OUTPUT_TAIL,
  type TaskMessage,
  type TaskStatusMessage,
} from "../mqtt/messages.ts";

/** What the runner needs of a task message. */
export type TaskSpec = Pick<TaskMessage, "id" | "command" | "env" | "cwd" | "timeoutSeconds">;

/** One status report: a task-status message without its envelope. */
export type TaskReport = Omit<TaskStatusMessage, keyof Envelope | "type">;

export interface TaskRunnerOptions {
  /** `["*"]` = everything; otherwise exact executable names or absolute paths. */
  allow: string[];
  /** Where `task-ids.json` is kept. */
  stateDir: string;
  /** Working directory when a task names none. */
  defaultCwd: string;
  /** Between SIGTERM and SIGKILL. */
  killGraceMs: number;
  /** Bytes of stdout / stderr kept (the tail). */
  maxOutputBytes?: number;
  /** How many task ids are remembered. */
  maxRememberedIds?: number;
  /** Environment every task starts from (the agent's own env is NOT inherited). */
  baseEnv?: Record<string, string>;
  log?: (event: string, fields: Record<string, unknown>) => void;
}

/** Decides whether argv[0] may run. */
export function isAllowed(allow: string[], executable: string): boolean {
  if (allow.includes("*")) return true;
  return allow.includes(executable);
}

/** The last `max` bytes of a stream, decoded as UTF-8 at the end. */
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
  text(): string {
    const all = new Uint8Array(this.size);
    let off = 0;
    for (const c of this.chunks) {
      all.set(c, off);
      off += c.byteLength;
    }
    let bytes = all.byteLength > this.max ? all.subarray(all.byteLength - this.max) : all;
    // Do not start in the middle of a UTF-8 sequence.
    let skip = 0;
    while (skip < 4 && skip < bytes.length && (bytes[skip] & 0xc0) === 0x80) skip++;
    bytes = bytes.subarray(skip);
    const s = new TextDecoder().decode(bytes);
    // Characters bound from messages.ts (the decoded text is at most max bytes anyway).
    return s.length > MAX_OUTPUT_TAIL ? s.slice(s.length - MAX_OUTPUT_TAIL) : s;
  }
}

/** Remembers task ids already accepted (bounded, persisted with an atomic rename). */
export class TaskIdStore {
  private ids: string[] = [];
  private set = new Set<string>();
  private loaded = false;
  constructor(private readonly file: string, private readonly max = 1000) {}

  private async load() {
    if (this.loaded) return;
    this.loaded = true;
    try {
      const parsed = JSON.parse(await Deno.readTextFile(this.file));
      if (Array.isArray(parsed?.ids)) {
        this.ids = parsed.ids.filter((x: unknown) => typeof x === "string").slice(-this.max);
      }
    } catch {
      // Missing or corrupt: start empty. (A corrupt file only loses dedupe memory.)
    }
    this.set = new Set(this.ids);
  }

  /** True the first time an id is seen; false for a repeat. Persists before returning. */
  async claim(id: string): Promise<boolean> {
    await this.load();
    if (this.set.has(id)) return false;
    this.ids.push(id);
    this.set.add(id);
    while (this.ids.length > this.max) this.set.delete(this.ids.shift()!);
    const dir = this.file.slice(0, this.file.lastIndexOf("/"));
    await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
    const tmp = `${this.file}.tmp`;
    await Deno.writeTextFile(tmp, JSON.stringify({ ids: this.ids }) + "\n", { mode: 0o600 });
    await Deno.rename(tmp, this.file);
    return true;
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

export class TaskRunner {
  private readonly ids: TaskIdStore;
  private readonly running = new Map<
    string,
    { cancel: (why: string) => void; done: Promise<void> }
  >();
  private readonly maxOut: number;

  constructor(private readonly opts: TaskRunnerOptions) {
    this.ids = new TaskIdStore(join(opts.stateDir, "task-ids.json"), opts.maxRememberedIds);
    this.maxOut = opts.maxOutputBytes ?? 64 * 1024;
  }

  get runningCount(): number {
    return this.running.size;
  }

  /**
   * Handles one delivered task. Resolves when the task has finished (or was refused, or was a
   * duplicate). Never throws: every failure becomes a report.
   */
  async handle(task: TaskSpec, report: (r: TaskReport) => void): Promise<"run" | "duplicate"> {
    let first: boolean;
    try {
      first = await this.ids.claim(task.id);
    } catch (err) {
      // Without the id file we cannot promise at-most-once: refuse rather than risk a rerun.
      report({
        taskId: task.id,
        state: "failed",
        error: `cannot record task id: ${(err as Error).message}`,
      });
      return "run";
    }
    if (!first) {
      this.opts.log?.("task.duplicate", { task: task.id });
      return "duplicate";
    }
    const exe = task.command[0];
    if (!isAllowed(this.opts.allow, exe)) {
      report({
        taskId: task.id,
        state: "refused",
        error: this.opts.allow.length === 0
          ? `no task may run: tasks.allow is empty in the agent config`
          : `executable ${JSON.stringify(exe)} is not in tasks.allow`,
      });
      return "run";
    }
    report({ taskId: task.id, state: "accepted" });
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

  /** Stops every running task and waits for their reports. */
  async stopAll(why = "agent stopping"): Promise<void> {
    const all = [...this.running.values()];
    for (const r of all) r.cancel(why);
    await Promise.all(all.map((r) => r.done.catch(() => {})));
  }

  private async execute(
    task: TaskSpec,
    report: (r: TaskReport) => void,
    cancelled: Promise<string>,
  ): Promise<void> {
    const [exe, ...args] = task.command;
    const cwd = task.cwd ?? this.opts.defaultCwd;
    try {
      if (!(await Deno.stat(cwd)).isDirectory) throw new Error("not a directory");
    } catch (err) {
      report({
        taskId: task.id,
        state: "failed",
        error: `working directory ${cwd}: ${
          err instanceof Deno.errors.NotFound ? "does not exist" : (err as Error).message
        }`,
      });
      return;
    }
    let child: Deno.ChildProcess;
    try {
      child = new Deno.Command(exe, {
        args,
        cwd,
        clearEnv: true,
        env: { ...(this.opts.baseEnv ?? defaultBaseEnv()), ...task.env },
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
        // Its own process group, so a timeout also stops what the task started.
        detached: true,
      }).spawn();
    } catch (err) {
      const error = err instanceof Deno.errors.NotFound
        ? `executable not found: ${exe}${isAbsolute(exe) ? "" : " (searched PATH)"}`
        : err instanceof Deno.errors.PermissionDenied
        ? `executable not runnable (permission denied): ${exe}`
        : `cannot start ${exe}: ${(err as Error).message}`;
      report({ taskId: task.id, state: "failed", error });
      return;
    }
    const pid = child.pid;
    this.opts.log?.("task.running", { task: task.id, pid, exe });
    report({ taskId: task.id, state: "running" });

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
    const stdout = out.text();
    const stderr = err.text();
    if (stopReason !== undefined) {
      report({
        taskId: task.id,
        state: "failed",
        exitCode,
        stdout,
        stderr,
        error: `${stopReason}; stopped with ${st.signal ?? `exit ${st.code}`}${
          st.signal === "SIGKILL" ? ` (SIGTERM was ignored for ${this.opts.killGraceMs} ms)` : ""
        }`,
      });
    } else if (st.signal) {
      report({
        taskId: task.id,
        state: "failed",
        exitCode: null,
        stdout,
        stderr,
        error: `killed by ${st.signal}`,
      });
    } else {
      report({ taskId: task.id, state: "done", exitCode: st.code, stdout, stderr });
    }
    this.opts.log?.("task.finished", {
      task: task.id,
      exit: st.signal ?? st.code,
      stdoutBytes: out.total,
      stderrBytes: err.total,
    });
  }
}
