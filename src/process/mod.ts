/**
 * The one process helper. Every external binary k8s4r drives (spire-server, spire-agent,
 * mosquitto, openssl, docker, k8s4r itself) goes through a `ProcessRunner`:
 *
 * - `output()` runs a short command to completion and throws `ProcessError` (with its stderr)
 *   when it fails;
 * - `spawn()` starts a daemon with a log file, an optional pid file and a readiness probe;
 * - `stopPidFile()` stops a daemon started earlier, and only if the pid in the file still
 *   belongs to the very process k8s4r started.
 *
 * Tests inject a recording runner to assert exact argv without starting anything.
 */
import { CliError } from "../cli/errors.ts";

export interface OutputOptions {
  cwd?: string;
  /** Extra environment variables, merged over the current environment. */
  env?: Record<string, string>;
  /** Written to the process's stdin, then stdin is closed. Keeps secrets off the argv. */
  stdin?: string | Uint8Array;
  /** Kill the process (SIGKILL) after this long. Default 60 s. */
  timeoutMs?: number;
  /** When false, a non-zero exit is returned instead of thrown. Default true. */
  check?: boolean;
  signal?: AbortSignal;
}

export interface OutputResult {
  code: number;
  success: boolean;
  stdout: string;
  stderr: string;
}

export interface DaemonSpec {
  /** Component name, used in messages ("spire-server"). */
  name: string;
  cmd: string;
  args: string[];
  cwd?: string;
  env?: Record<string, string>;
  /** stdout and stderr are appended here. The directory is created. */
  logFile: string;
  /** When set, `{pid, startTime, cmd, args, startedAt}` is written here (mode 0600). */
  pidFile?: string;
  /**
   * A new session, so that the daemon outlives the CLI that started it (devenv). Otherwise the
   * daemon gets SIGTERM when its parent dies (PR_SET_PDEATHSIG via setpriv), so no orphan
   * survives even a `kill -9` of the parent.
   */
  detached?: boolean;
  /**
   * Rewrites each output line before it reaches the log file (e.g. to redact secrets that a
   * third-party binary prints). The output then flows through this process, so it is only
   * allowed for non-detached daemons: a detached one would lose its log when we exit.
   */
  logFilter?: (line: string) => string;
  /** Resolves true once the daemon serves. Polled until it does. */
  ready?: () => Promise<boolean>;
  readyTimeoutMs?: number;
  /** Poll interval for `ready`. Default 50 ms. */
  readyIntervalMs?: number;
}

export interface Daemon {
  readonly name: string;
  readonly pid: number;
  /** Resolves with the exit code (128+n for a signal) when the daemon ends. */
  readonly exited: Promise<number>;
  /** SIGTERM, then SIGKILL after `graceMs` (default 5 s). Resolves when the process is gone. */
  stop(graceMs?: number): Promise<void>;
}

export interface ProcessRunner {
  output(cmd: string, args: string[], opts?: OutputOptions): Promise<OutputResult>;
  spawn(spec: DaemonSpec): Promise<Daemon>;
}

/** A command that failed. The message names the command and its last stderr line. */
export class ProcessError extends CliError {
  constructor(
    readonly cmd: string,
    readonly args: string[],
    readonly result: OutputResult,
    what?: string,
  ) {
    const tail = lastLine(result.stderr) || lastLine(result.stdout) || "no output";
    super(`${what ?? `${cmd} ${args[0] ?? ""}`.trim()} failed (exit ${result.code}): ${tail}`, 1);
    this.name = "ProcessError";
  }
}

function lastLine(text: string): string {
  const lines = text.split("\n").map((l) => l.trim()).filter((l) => l.length > 0);
  return lines[lines.length - 1] ?? "";
}

const decoder = new TextDecoder();

/** Resolves when `probe` returns true; rejects after `timeoutMs` or when `signal` aborts. */
export async function waitFor(
  probe: () => Promise<boolean> | boolean,
  opts: {
    timeoutMs: number;
    intervalMs?: number;
    signal?: AbortSignal;
    what?: string;
    /** Checked before each probe: an error returned here ends the wait at once. */
    fatal?: () => Error | undefined;
  },
): Promise<void> {
  const deadline = Date.now() + opts.timeoutMs;
  const interval = opts.intervalMs ?? 50;
  while (true) {
    opts.signal?.throwIfAborted();
    const fatal = opts.fatal?.();
    if (fatal) throw fatal;
    let ok = false;
    try {
      ok = await probe();
    } catch {
      ok = false;
    }
    if (ok) return;
    if (Date.now() >= deadline) {
      throw new CliError(
        `timed out after ${opts.timeoutMs} ms waiting for ${opts.what ?? "readiness"}`,
      );
    }
    await delay(Math.min(interval, Math.max(0, deadline - Date.now())), opts.signal);
  }
}

/** A cancellable timer. This is for poll intervals and backoff, never for "wait until ready". */
export function delay(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal!.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * What a pid file holds. `startTime` (from /proc/PID/stat) tells a reused pid apart; start times
 * count from boot, so `bootId` tells a file from before a reboot apart; `exe` (/proc/PID/exe when
 * it was written) and `cmd` tell apart a process that only happens to have both.
 */
export interface PidRecord {
  pid: number;
  startTime: number;
  cmd: string;
  args: string[];
  startedAt: string;
  /** /proc/sys/kernel/random/boot_id when the record was written (absent in older files). */
  bootId?: string;
  /** The executable the process ran when the record was written (absent in older files). */
  exe?: string;
}

let bootIdCache: string | undefined;
/** This boot's id (/proc/sys/kernel/random/boot_id), or undefined where there is none. */
export function currentBootId(): string | undefined {
  if (bootIdCache === undefined) {
    try {
      bootIdCache = Deno.readTextFileSync("/proc/sys/kernel/random/boot_id").trim();
    } catch {
      return undefined;
    }
  }
  return bootIdCache;
}

/** The executable of a process (/proc/PID/exe; a replaced binary keeps its path). */
function procExe(pid: number): string | undefined {
  try {
    return Deno.readLinkSync(`/proc/${pid}/exe`).replace(/ \(deleted\)$/, "");
  } catch {
    return undefined;
  }
}

const base = (p: string) => p.slice(p.lastIndexOf("/") + 1);

/**
 * Whether the process of a record runs what the record says: the executable it recorded, or
 * (an older record, or /proc/PID/exe unreadable) a command line whose program, or script for an
 * interpreter, or executable has the base name of the record's `cmd`.
 */
export function runsRecordedCommand(rec: PidRecord): boolean {
  const exe = procExe(rec.pid);
  if (rec.exe && exe !== undefined) return exe === rec.exe;
  let argv: string[];
  try {
    argv = Deno.readTextFileSync(`/proc/${rec.pid}/cmdline`).split("\0");
  } catch {
    return false;
  }
  const want = base(rec.cmd);
  return [argv[0], argv[1], exe].some((a) => a !== undefined && a !== "" && base(a) === want);
}

/** The fields of /proc/PID/stat that k8s4r reads. */
export interface ProcStat {
  /** Field 2, without the parentheses (the kernel truncates it to 15 bytes). */
  comm: string;
  /** Field 3: R running, S sleeping, D disk wait, T stopped (SIGSTOP), t traced, Z zombie... */
  state: string;
  /** Field 4: parent pid. */
  ppid: number;
  /** Field 5: process group id. */
  pgrp: number;
  /** Field 6: session id. */
  session: number;
  /** Field 22: start time in clock ticks since boot. */
  startTime: number;
}

/** Parses /proc/PID/stat text; undefined when it is not one. */
export function parseProcStat(text: string): ProcStat | undefined {
  // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
  const open = text.indexOf("(");
  const close = text.lastIndexOf(")");
  if (open < 0 || close < open) return undefined;
  const rest = text.slice(close + 2).split(" ");
  const startTime = Number(rest[19]);
  if (!rest[0] || !Number.isFinite(startTime)) return undefined;
  return {
    comm: text.slice(open + 1, close),
    state: rest[0],
    ppid: Number(rest[1]),
    pgrp: Number(rest[2]),
    session: Number(rest[3]),
    startTime,
  };
}

/** The kernel's start time of a process in clock ticks since boot, or undefined if gone/zombie. */
export function processStartTime(pid: number): number | undefined {
  try {
    const st = parseProcStat(Deno.readTextFileSync(`/proc/${pid}/stat`));
    if (!st || st.state === "Z" || st.state === "X") return undefined; // a zombie is as good as gone
    return st.startTime;
  } catch {
    return undefined;
  }
}

export function readPidFile(path: string): PidRecord | undefined {
  try {
    const rec = JSON.parse(Deno.readTextFileSync(path));
    if (typeof rec?.pid === "number" && typeof rec?.startTime === "number") return rec;
    return undefined;
  } catch {
    return undefined;
  }
}

/**
 * True when the pid in the record is alive and is the very process the record was written for:
 * same boot, same start time, same command (runsRecordedCommand).
 */
/**
 * Programs that set something up and exec the daemon under the same pid (`setpriv` for the
 * death signal, `unshare` for PostgreSQL's user namespace as root): a pid file must record the
 * program they exec, not them. Recording `unshare` (caught before its exec) made every later
 * check of the running PostgreSQL say "not running", so its start never saw it ready.
 */
const EXEC_WRAPPERS = /(^|\/)(setpriv|unshare)$/;

export function isRecordAlive(rec: PidRecord | undefined): boolean {
  if (!rec) return false;
  if (rec.bootId !== undefined && rec.bootId !== currentBootId()) return false;
  const st = processStartTime(rec.pid);
  return st !== undefined && st === rec.startTime && runsRecordedCommand(rec);
}

/**
 * Stops the process named by a pid file, only if it is still the process we started: SIGTERM,
 * then SIGKILL after `graceMs`. Removes the pid file. Returns what it did.
 */
export async function stopPidFile(
  path: string,
  graceMs = 5000,
  signal: Deno.Signal = "SIGTERM",
): Promise<"stopped" | "killed" | "not-running"> {
  const rec = readPidFile(path);
  if (!rec || !isRecordAlive(rec)) {
    await Deno.remove(path).catch(() => {});
    return "not-running";
  }
  const how = await stopPid(rec.pid, rec.startTime, graceMs, signal);
  await Deno.remove(path).catch(() => {});
  return how;
}

/** SIGTERM (or `signal`), then SIGKILL, on a pid whose start time we checked. */
export async function stopPid(
  pid: number,
  startTime: number,
  graceMs: number,
  signal: Deno.Signal = "SIGTERM",
): Promise<"stopped" | "killed" | "not-running"> {
  const same = () => processStartTime(pid) === startTime;
  if (!same()) return "not-running";
  try {
    Deno.kill(pid, signal);
  } catch {
    return "not-running";
  }
  const exited = await waitFor(() => !same(), { timeoutMs: graceMs, intervalMs: 25 })
    .then(() => true, () => false);
  if (exited) return "stopped";
  if (same()) {
    try {
      Deno.kill(pid, "SIGKILL");
    } catch { /* gone in between */ }
    await waitFor(() => !same(), { timeoutMs: 5000, what: `pid ${pid} to exit` }).catch(() => {});
    return "killed";
  }
  return "stopped";
}

/** Last `n` lines of a file, or "" when it does not exist. */
export async function tailFile(path: string, n: number): Promise<string> {
  try {
    const text = await Deno.readTextFile(path);
    const lines = text.split("\n");
    if (lines[lines.length - 1] === "") lines.pop();
    return lines.slice(-n).join("\n");
  } catch {
    return "";
  }
}

async function writePrivate(path: string, text: string): Promise<void> {
  const dir = path.slice(0, path.lastIndexOf("/"));
  if (dir) await Deno.mkdir(dir, { recursive: true });
  const tmp = `${path}.tmp-${Deno.pid}`;
  await Deno.writeTextFile(tmp, text, { mode: 0o600 });
  await Deno.chmod(tmp, 0o600);
  await Deno.rename(tmp, path);
}

let setprivAvailable: boolean | undefined;
function hasSetpriv(): boolean {
  if (setprivAvailable === undefined) {
    try {
      setprivAvailable = Deno.statSync("/usr/bin/setpriv").isFile;
    } catch {
      setprivAvailable = false;
    }
  }
  return setprivAvailable;
}

/** The runner that really starts processes. */
export const realRunner: ProcessRunner = {
  async output(cmd, args, opts = {}) {
    let child: Deno.ChildProcess;
    try {
      child = new Deno.Command(cmd, {
        args,
        cwd: opts.cwd,
        env: opts.env,
        stdin: opts.stdin !== undefined ? "piped" : "null",
        stdout: "piped",
        stderr: "piped",
        signal: opts.signal,
      }).spawn();
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) {
        throw new CliError(`${cmd}: command not found`, 1);
      }
      throw err;
    }
    if (opts.stdin !== undefined) {
      const w = child.stdin.getWriter();
      await w.write(
        typeof opts.stdin === "string" ? new TextEncoder().encode(opts.stdin) : opts.stdin,
      )
        .catch(() => {});
      await w.close().catch(() => {});
    }
    const timer = setTimeout(() => {
      try {
        child.kill("SIGKILL");
      } catch { /* already exited */ }
    }, opts.timeoutMs ?? 60_000);
    try {
      const out = await child.output();
      const result: OutputResult = {
        code: out.code,
        success: out.success,
        stdout: decoder.decode(out.stdout),
        stderr: decoder.decode(out.stderr),
      };
      if (!result.success && opts.check !== false) throw new ProcessError(cmd, args, result);
      return result;
    } finally {
      clearTimeout(timer);
    }
  },

  async spawn(spec) {
    await Deno.mkdir(spec.logFile.slice(0, spec.logFile.lastIndexOf("/")) || ".", {
      recursive: true,
    });
    // Deno.Command cannot hand a file descriptor to the child, and a detached daemon must keep
    // logging after the CLI exits. So a tiny sh redirects and then execs the real binary: the
    // pid we get is the daemon's own. No secret is ever in spec.args (tokens go through files).
    const inner = !spec.detached && hasSetpriv()
      ? ["setpriv", "--pdeathsig", "TERM", "--", spec.cmd, ...spec.args]
      : [spec.cmd, ...spec.args];
    if (spec.logFilter && spec.detached) {
      throw new CliError(`${spec.name}: a log filter needs a non-detached daemon`);
    }
    const filtered = spec.logFilter !== undefined;
    const child = new Deno.Command("/bin/sh", {
      args: [
        "-c",
        filtered ? 'exec "$@" 2>&1 </dev/null' : 'exec "$@" >>"$K8S4R_LOG_FILE" 2>&1 </dev/null',
        "k8s4r-daemon",
        ...inner,
      ],
      cwd: spec.cwd,
      env: { ...spec.env, K8S4R_LOG_FILE: spec.logFile },
      stdin: "null",
      stdout: filtered ? "piped" : "null",
      stderr: "null",
      detached: spec.detached ?? false,
    }).spawn();
    const logPumped = filtered
      ? pumpFiltered(child.stdout, spec.logFile, spec.logFilter!)
      : undefined;
    const pid = child.pid;
    const exited = child.status.then(async (s) => {
      await logPumped; // the last lines are in the log before anyone hears of the exit
      return s.signal ? 128 + signalNumber(s.signal) : s.code;
    });
    if (spec.detached) child.unref();
    let startTime: number | undefined;
    let exe: string | undefined;
    // The shell execs within microseconds; wait until /proc shows the real binary so the pid
    // file records the daemon's own start time and executable. An empty command line is an
    // exec in progress (the new memory is mapped, its arguments not yet): not done either, and
    // the executable is read only once the command line is the daemon's.
    await waitFor(() => {
      startTime = processStartTime(pid);
      if (startTime === undefined) return true; // already exited; reported below
      try {
        const argv0 = Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0")[0];
        if (argv0 === "" || argv0.endsWith("sh") || EXEC_WRAPPERS.test(argv0)) return false;
        const e = procExe(pid);
        if (e === undefined || /(^|\/)(sh|dash|bash)$/.test(e) || EXEC_WRAPPERS.test(e)) {
          return false;
        }
        exe = e;
        return true;
      } catch {
        return true;
      }
    }, { timeoutMs: 5000, intervalMs: 2, what: `${spec.name} to exec` }).catch(async (err) => {
      // Never exec'd: no pid file was written, so nothing else could stop it. It is our own
      // child (the handle says so, whatever its pid means by now): kill it before giving up.
      try {
        child.kill("SIGKILL");
      } catch { /* gone */ }
      await exited.catch(() => {});
      throw err;
    });
    startTime = processStartTime(pid);
    let done = false;
    let exitCode = -1;
    exited.then((c) => {
      done = true;
      exitCode = c;
    });
    if (spec.pidFile && startTime !== undefined) {
      const bootId = currentBootId();
      const rec: PidRecord = {
        pid,
        startTime,
        cmd: spec.cmd,
        args: spec.args,
        startedAt: new Date().toISOString(),
        ...(bootId ? { bootId } : {}),
        ...(exe ? { exe } : {}),
      };
      await writePrivate(spec.pidFile, JSON.stringify(rec) + "\n");
    }
    const daemon: Daemon = {
      name: spec.name,
      pid,
      exited,
      async stop(graceMs = 5000) {
        if (!done && startTime !== undefined) await stopPid(pid, startTime, graceMs);
        if (!spec.detached) await exited.catch(() => {});
        if (spec.pidFile) {
          const rec = readPidFile(spec.pidFile);
          if (rec?.pid === pid) await Deno.remove(spec.pidFile).catch(() => {});
        }
      },
    };
    if (spec.ready) {
      const ready = spec.ready;
      try {
        await waitFor(ready, {
          fatal: () => done ? new CliError(`${spec.name} exited`) : undefined,
          timeoutMs: spec.readyTimeoutMs ?? 15_000,
          intervalMs: spec.readyIntervalMs ?? 50,
          what: `${spec.name} to become ready`,
        }).catch(async (err) => {
          if (done) {
            throw new CliError(
              `${spec.name} exited with code ${exitCode} before it was ready (log: ${spec.logFile}): ${
                lastLine(await tailFile(spec.logFile, 5)) || "no output"
              }`,
            );
          }
          // Still running, not ready: what it said last is the first clue (a lock, a port).
          const said = lastLine(await tailFile(spec.logFile, 5).catch(() => ""));
          throw new CliError(
            `${err.message} (log: ${spec.logFile}${said ? `; its last line: ${said}` : ""})`,
          );
        });
      } catch (err) {
        await daemon.stop(1000);
        throw err;
      }
    }
    return daemon;
  },
};

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  for (let off = 0; off < bytes.length;) off += await file.write(bytes.subarray(off));
}

/** Copies a child's output into its log file line by line, through `filter`. */
async function pumpFiltered(
  stream: ReadableStream<Uint8Array>,
  logFile: string,
  filter: (line: string) => string,
): Promise<void> {
  const file = await Deno.open(logFile, { append: true, create: true });
  const enc = new TextEncoder();
  let pending = "";
  try {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      pending += chunk;
      const lines = pending.split("\n");
      pending = lines.pop() ?? "";
      if (lines.length) await writeAll(file, enc.encode(lines.map(filter).join("\n") + "\n"));
    }
    if (pending) await writeAll(file, enc.encode(filter(pending) + "\n"));
  } catch {
    // The child's output closed abruptly; what was written stays written.
  } finally {
    file.close();
  }
}

function signalNumber(sig: Deno.Signal): number {
  // Linux numbers (signal(7)). A crash (SIGSEGV, SIGABRT) must read as one: 139, 134.
  const table: Partial<Record<Deno.Signal, number>> = {
    SIGHUP: 1,
    SIGINT: 2,
    SIGQUIT: 3,
    SIGILL: 4,
    SIGTRAP: 5,
    SIGABRT: 6,
    SIGBUS: 7,
    SIGFPE: 8,
    SIGKILL: 9,
    SIGUSR1: 10,
    SIGSEGV: 11,
    SIGUSR2: 12,
    SIGPIPE: 13,
    SIGALRM: 14,
    SIGTERM: 15,
    SIGXCPU: 24,
    SIGXFSZ: 25,
    SIGSYS: 31,
  };
  return table[sig] ?? 0;
}

/** A runner that records every call and answers from a script. For unit tests. */
export class RecordingRunner implements ProcessRunner {
  readonly calls: { cmd: string; args: string[]; opts?: OutputOptions | DaemonSpec }[] = [];
  constructor(
    private readonly answer: (cmd: string, args: string[]) => Partial<OutputResult> | Error =
      () => ({}),
  ) {}

  output(cmd: string, args: string[], opts?: OutputOptions): Promise<OutputResult> {
    this.calls.push({ cmd, args, opts });
    const a = this.answer(cmd, args);
    if (a instanceof Error) return Promise.reject(a);
    const result: OutputResult = {
      code: a.code ?? 0,
      success: (a.code ?? 0) === 0,
      stdout: a.stdout ?? "",
      stderr: a.stderr ?? "",
    };
    if (!result.success && opts?.check !== false) {
      return Promise.reject(new ProcessError(cmd, args, result));
    }
    return Promise.resolve(result);
  }

  spawn(spec: DaemonSpec): Promise<Daemon> {
    this.calls.push({ cmd: spec.cmd, args: spec.args, opts: spec });
    let resolveExit!: (c: number) => void;
    const exited = new Promise<number>((r) => (resolveExit = r));
    return Promise.resolve({
      name: spec.name,
      pid: 0,
      exited,
      stop: () => {
        resolveExit(143);
        return Promise.resolve();
      },
    });
  }
}
