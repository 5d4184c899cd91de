/**
 * What a task may be and how it is started: the executable resolved with the AGENT's PATH before
 * the allow-list is consulted, a minimal environment plus only the variables `tasks.allowEnv`
 * names, and the command line that starts it in its cgroup (task_cgroup.ts), under util-linux
 * `prlimit` (rlimits) and `setpriv` (another uid and gid, no supplementary groups, no
 * capabilities, no_new_privs, SIGKILL when the agent dies). Pure functions, except for `stat`
 * calls.
 *
 * An allowed executable takes ANY argv: allowing `tar`, `find`, `git`, `env`, `awk`, `sed`,
 * `sh`, an interpreter or a package manager allows running anything. Allow fixed scripts.
 */
import { isAbsolute, join, normalize } from "node:path";

export const SETPRIV = "/usr/bin/setpriv";
export const PRLIMIT = "/usr/bin/prlimit";

/** PATH the agent searches (and gives tasks) when its own environment has none. */
export const DEFAULT_TASK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/**
 * The variables a task may set when `tasks.allowEnv` is not configured: locale and time zone.
 * glibc reads only data for them (locale archives under /usr/lib/locale, zoneinfo files), never
 * code. Any other name is refused: which variables make which program run code is open-ended
 * (TAR_OPTIONS, GIT_*, PYTHON*, HOME and XDG_CONFIG_HOME for git's fsmonitor, GOFLAGS,
 * MAKEFLAGS, npm_config_*, GST_PLUGIN_PATH, QT_PLUGIN_PATH, AMENT_PREFIX_PATH, VK_LAYER_PATH,
 * ...), so a deny list is never complete.
 */
export const DEFAULT_ALLOW_ENV: readonly string[] = ["LANG", "LANGUAGE", "LC_*", "TZ"];

/**
 * Names `tasks.allowEnv` may never cover. A task's environment is the environment of its whole
 * start chain: /bin/sh (the cgroup step), prlimit and setpriv run as the AGENT before setpriv
 * switches to the task user, so a loader or shell hook would run code as the agent (root). And
 * PATH: the agent resolved the executable with its own.
 */
export const NEVER_ALLOWED_ENV_NAMES: readonly string[] = [
  "PATH",
  // shells (/bin/sh is bash on some systems): startup files, traces that run code, options
  "IFS",
  "ENV",
  "BASH_ENV",
  "SHELLOPTS",
  "BASHOPTS",
  "PS4",
  "PROMPT_COMMAND",
  // glibc's "unsecure" variables (ld.so drops them for setuid programs; never allowed here)
  "GCONV_PATH",
  "GETCONF_DIR",
  "HOSTALIASES",
  "LOCALDOMAIN",
  "LOCPATH",
  "NIS_PATH",
  "NLSPATH",
  "RESOLV_HOST_CONF",
  "RES_OPTIONS",
  "TMPDIR",
  "TZDIR",
];

/** ... and every name starting with one of these. */
export const NEVER_ALLOWED_ENV_PREFIXES: readonly string[] = [
  "LD_", // the dynamic loader: LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...
  "DYLD_",
  "GLIBC_", // GLIBC_TUNABLES
  "MALLOC_", // MALLOC_TRACE, MALLOC_CHECK_, ...
  "BASH_FUNC_", // exported shell functions
];

const NEVER = new Set(NEVER_ALLOWED_ENV_NAMES);
const ENTRY_RE = /^(?:[A-Za-z_][A-Za-z0-9_]*\*?|\*)$/;

/** Why `name` can never be allowed, or undefined. */
function neverAllowed(name: string): string | undefined {
  if (NEVER.has(name)) {
    return name === "PATH"
      ? "PATH: the agent resolves the executable with its own PATH and gives tasks that one"
      : `${name}: a loader or shell hook of the start chain, which runs as the agent`;
  }
  const p = NEVER_ALLOWED_ENV_PREFIXES.find((x) => name.startsWith(x));
  return p ? `${name}: ${p}* variables are loader or shell hooks of the start chain` : undefined;
}

/**
 * What is wrong with a `tasks.allowEnv` entry (the config's "expected ..." text), or undefined.
 * An entry is a variable name, or a prefix ending in `*` (`LC_*`); it may cover no name of
 * `NEVER_ALLOWED_ENV_NAMES` and no prefix of `NEVER_ALLOWED_ENV_PREFIXES`.
 */
export function allowEnvEntryError(entry: string): string | undefined {
  if (!ENTRY_RE.test(entry)) {
    return `expected variable names or prefixes ending in * (LC_*), got ${JSON.stringify(entry)}`;
  }
  if (!entry.endsWith("*")) {
    const why = neverAllowed(entry);
    return why ? `${JSON.stringify(entry)} can never be allowed (${why})` : undefined;
  }
  const prefix = entry.slice(0, -1);
  const name = NEVER_ALLOWED_ENV_NAMES.find((n) => n.startsWith(prefix));
  const pre = NEVER_ALLOWED_ENV_PREFIXES.find((p) => p.startsWith(prefix) || prefix.startsWith(p));
  if (name || pre) {
    return `${JSON.stringify(entry)} would allow ${
      name ?? `${pre}*`
    }, which can never be allowed (${neverAllowed(name ?? pre!)})`;
  }
  return undefined;
}

/** Whether `allow` (entries checked by `allowEnvEntryError`) lets a task set `name`. */
export function envAllowed(allow: readonly string[], name: string): boolean {
  if (neverAllowed(name)) return false; // belt and braces: entries were checked at load
  return allow.some((e) => e.endsWith("*") ? name.startsWith(e.slice(0, -1)) : e === name);
}

/** The first variable of a task's environment that `allow` does not permit, as a refusal. */
export function checkTaskEnv(
  env: Record<string, string>,
  allow: readonly string[] = DEFAULT_ALLOW_ENV,
): string | undefined {
  for (const name of Object.keys(env)) {
    if (envAllowed(allow, name)) continue;
    const never = neverAllowed(name);
    return never
      ? `environment variable ${never} (see docs/PROTOCOL.md, "Task sandbox")`
      : `environment variable ${name} is not in tasks.allowEnv (${
        allow.length ? allow.join(", ") : "empty: a task may set no variable"
      }; see docs/PROTOCOL.md, "Task sandbox")`;
  }
  return undefined;
}

/** The agent's PATH, reduced to absolute directories (an empty or relative entry means cwd). */
export function agentPath(env: { PATH?: string } = { PATH: Deno.env.get("PATH") }): string {
  const dirs = (env.PATH ?? "").split(":").filter((d) => isAbsolute(d));
  return dirs.length > 0 ? dirs.join(":") : DEFAULT_TASK_PATH;
}

/** The environment every task starts from; the task's own variables go on top. */
export function minimalEnv(o: {
  path: string;
  user?: { name: string; home: string };
  agentEnv?: Record<string, string | undefined>;
}): Record<string, string> {
  const a = o.agentEnv ?? Deno.env.toObject();
  const env: Record<string, string> = { PATH: o.path };
  const home = o.user?.home ?? a.HOME;
  if (home) env.HOME = home;
  const user = o.user?.name ?? a.USER ?? a.LOGNAME;
  if (user) {
    env.USER = user;
    env.LOGNAME = user;
  }
  env.LANG = a.LANG ?? "C.UTF-8";
  if (a.TZ) env.TZ = a.TZ;
  return env;
}

export type Resolved = { ok: true; path: string } | { ok: false; error: string };

function runnable(path: string): "yes" | "missing" | "denied" | "not-file" {
  try {
    const st = Deno.statSync(path);
    if (!st.isFile) return "not-file";
    return ((st.mode ?? 0o755) & 0o111) !== 0 ? "yes" : "denied";
  } catch (err) {
    return err instanceof Deno.errors.PermissionDenied ? "denied" : "missing";
  }
}

/**
 * `exe` as the file that will run: an absolute path as it is (normalized), a bare name looked
 * up in `path` (the agent's). A relative path with a slash is refused: it would depend on the
 * task's working directory.
 */
export function resolveExecutable(exe: string, path: string): Resolved {
  if (isAbsolute(exe)) {
    const p = normalize(exe);
    const r = runnable(p);
    if (r === "yes") return { ok: true, path: p };
    return {
      ok: false,
      error: r === "missing"
        ? `executable not found: ${exe}`
        : r === "not-file"
        ? `executable ${exe} is not a regular file`
        : `executable not runnable (permission denied): ${exe}`,
    };
  }
  if (exe.includes("/")) {
    return {
      ok: false,
      error: `executable ${JSON.stringify(exe)}: expected a program name or an absolute path`,
    };
  }
  let denied = false;
  for (const dir of path.split(":")) {
    if (!isAbsolute(dir)) continue;
    const p = join(dir, exe);
    const r = runnable(p);
    if (r === "yes") return { ok: true, path: p };
    if (r === "denied") denied = true;
  }
  return {
    ok: false,
    error: denied
      ? `executable not runnable (permission denied): ${exe}`
      // The agent's PATH stays on the robot: the error goes to everyone who may view the task.
      : `executable not found in the agent's PATH: ${exe}`,
  };
}

/**
 * Whether the resolved file may run: `*` allows everything; an absolute entry allows exactly
 * that path; a name allows exactly the file that name resolves to with the agent's PATH (so a
 * task naming `/tmp/x/echo` is not allowed by `echo`).
 */
export function isAllowed(allow: readonly string[], resolved: string, path: string): boolean {
  if (allow.includes("*")) return true;
  return allow.some((entry) => {
    if (isAbsolute(entry)) return normalize(entry) === resolved;
    const r = resolveExecutable(entry, path);
    return r.ok && r.path === resolved;
  });
}

/** What `tasks.allow` permits, for the agent's own log: each entry and the file it resolves to. */
export function describeAllowList(allow: readonly string[], path: string): string {
  return allow.map((e) => {
    if (e === "*" || isAbsolute(e)) return e;
    const r = resolveExecutable(e, path);
    return r.ok ? `${e} (${r.path})` : `${e} (not found)`;
  }).join(", ");
}

/** rlimits of every task (prlimit). */
export interface TaskLimits {
  /** RLIMIT_CPU, seconds of CPU time: SIGXCPU at this, SIGKILL 5 s later. */
  cpuSeconds: number;
  /**
   * RLIMIT_DATA, bytes: heap and private writable mappings, i.e. memory the task allocates.
   * Not RLIMIT_AS: Go, JVM and V8 programs reserve far more address space than they use, and
   * SPIRE's own Go client failed to start under a 1 GiB RLIMIT_AS (tests/task_identity_test.ts).
   */
  memoryBytes: number;
  /** RLIMIT_NOFILE. */
  openFiles: number;
  /** RLIMIT_NPROC (per uid: only applied when tasks run as their own user). */
  processes?: number;
}

export interface SandboxUser {
  uid: number;
  gid: number;
}

/** The shell that moves the task's first process into its cgroup before anything runs. */
export const SH = "/bin/sh";

/**
 * The cgroup step: the process writes itself into the task's `cgroup.procs` (its `$0`), then
 * execs the rest. When it cannot, it says so on stderr and exits `CGROUP_EXIT` before the task
 * runs.
 */
const CGROUP_STEP =
  '{ echo 0 >"$0"; } 2>/dev/null || { echo "k8s4r: cannot move the task into its cgroup ($0)" >&2; exit 125; }; exec "$@"';
export const CGROUP_EXIT = 125;
export const CGROUP_STEP_ERROR = /^k8s4r: cannot move the task into its cgroup .*$/m;

/**
 * The argv that starts `exe` sandboxed: with a cgroup, `/bin/sh` first moves the process into
 * it (`cgroupProcs`, the cgroup's `cgroup.procs`); `prlimit` sets the rlimits and execs
 * `setpriv`, which switches to the task user (when given), clears supplementary groups,
 * inheritable and ambient capabilities and the bounding set (when the agent holds CAP_SETPCAP:
 * then even a task running as root has no capability), sets no_new_privs and
 * PR_SET_PDEATHSIG=SIGKILL, and execs the task. Same pid all along: the task leads its process
 * group, and the agent signals it directly.
 */
export function sandboxArgv(o: {
  exe: string;
  args: readonly string[];
  limits: TaskLimits;
  user?: SandboxUser;
  dropBoundingSet?: boolean;
  cgroupProcs?: string;
}): { cmd: string; args: string[] } {
  const l = o.limits;
  const limits = [
    `--cpu=${l.cpuSeconds}:${l.cpuSeconds + 5}`,
    `--data=${l.memoryBytes}`,
    `--nofile=${l.openFiles}`,
    "--core=0",
  ];
  if (o.user && l.processes !== undefined) limits.push(`--nproc=${l.processes}`);
  const priv: string[] = [];
  if (o.user) {
    priv.push(`--reuid=${o.user.uid}`, `--regid=${o.user.gid}`, "--clear-groups");
  }
  if (o.dropBoundingSet) priv.push("--bounding-set=-all");
  priv.push("--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs", "--pdeathsig=KILL");
  const rest = [...limits, "--", SETPRIV, ...priv, "--", o.exe, ...o.args];
  if (o.cgroupProcs !== undefined) {
    return { cmd: SH, args: ["-c", CGROUP_STEP, o.cgroupProcs, PRLIMIT, ...rest] };
  }
  return { cmd: PRLIMIT, args: rest };
}
