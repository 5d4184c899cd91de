/**
 * What a task may be and how it is started: the executable resolved with the AGENT's PATH before
 * the allow-list is consulted, a minimal environment with a deny list of loader, shell and
 * interpreter hooks, and the command line that starts it under util-linux `prlimit` (rlimits)
 * and `setpriv` (another uid and gid, no supplementary groups, no capabilities,
 * no_new_privs, SIGKILL when the agent dies). Pure functions, except for `stat` calls.
 */
import { isAbsolute, join, normalize } from "node:path";

export const SETPRIV = "/usr/bin/setpriv";
export const PRLIMIT = "/usr/bin/prlimit";

/** PATH the agent searches (and gives tasks) when its own environment has none. */
export const DEFAULT_TASK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/**
 * Variables a task may not set: each makes a program load code, run a command or read its
 * configuration from where the task says. Exact names:
 */
export const DENIED_ENV_NAMES: readonly string[] = [
  // the search path: the agent resolved the executable with its own; so does everything after
  "PATH",
  // shells: startup files, word splitting, traces that run code, exported functions' paths
  "IFS",
  "ENV",
  "BASH_ENV",
  "SHELLOPTS",
  "BASHOPTS",
  "PS4",
  "PROMPT_COMMAND",
  "CDPATH",
  "GLOBIGNORE",
  "ZDOTDIR",
  // glibc's "unsecure" variables (ld.so drops them for setuid programs; we refuse them always)
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
  // interpreters and runtimes that load code from a variable
  "JDK_JAVA_OPTIONS",
  "CLASSPATH",
  "GEM_HOME",
  "GEM_PATH",
  "TCLLIBPATH",
  "PHPRC",
  "PHP_INI_SCAN_DIR",
  "R_PROFILE",
  "R_PROFILE_USER",
  "R_ENVIRON",
  "OPENSSL_CONF",
  "OPENSSL_ENGINES",
  // commands other programs run on the task's behalf
  "EDITOR",
  "VISUAL",
  "PAGER",
  "MANPAGER",
  "LESSOPEN",
  "LESSCLOSE",
  "BROWSER",
  "SSH_ASKPASS",
  "SUDO_ASKPASS",
];

/** ... and every name starting with one of these. */
export const DENIED_ENV_PREFIXES: readonly string[] = [
  "LD_", // the dynamic loader: LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...
  "DYLD_",
  "GLIBC_", // GLIBC_TUNABLES
  "MALLOC_", // MALLOC_TRACE, MALLOC_CHECK_, ...
  "BASH_FUNC_",
  "PYTHON", // PYTHONPATH, PYTHONSTARTUP, PYTHONHOME, ...
  "PERL", // PERL5LIB, PERL5OPT, PERLLIB, PERLIO, ...
  "RUBY", // RUBYOPT, RUBYLIB
  "NODE_", // NODE_OPTIONS, NODE_PATH
  "DENO_",
  "LUA_",
  "JAVA_", // JAVA_TOOL_OPTIONS
  "_JAVA_",
  "GIT_", // GIT_SSH_COMMAND, GIT_EXEC_PATH, GIT_CONFIG_*, GIT_ASKPASS
];

const DENIED = new Set(DENIED_ENV_NAMES);

/** Why a task may not set `name`, or undefined when it may. */
export function deniedEnvName(name: string): string | undefined {
  if (DENIED.has(name)) {
    return name === "PATH"
      ? "PATH: the agent resolves the executable with its own PATH and gives tasks that one"
      : `${name}: a loader, shell or interpreter hook`;
  }
  const p = DENIED_ENV_PREFIXES.find((x) => name.startsWith(x));
  return p ? `${name}: ${p}* variables are loader or interpreter hooks` : undefined;
}

/** The first environment variable of a task that is denied, as a refusal message. */
export function checkTaskEnv(env: Record<string, string>): string | undefined {
  for (const name of Object.keys(env)) {
    const why = deniedEnvName(name);
    if (why) return `environment variable ${why} (see docs/PROTOCOL.md, "Task sandbox")`;
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
      : `executable not found: ${exe} (searched the agent's PATH ${path})`,
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

/** What `tasks.allow` permits, for refusal messages: each entry and the file it resolves to. */
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

/**
 * The argv that starts `exe` sandboxed: `prlimit` sets the rlimits and execs `setpriv`, which
 * switches to the task user (when given), clears supplementary groups, inheritable and ambient
 * capabilities (and the bounding set when the agent may), sets no_new_privs and
 * PR_SET_PDEATHSIG=SIGKILL, and execs the task. Same pid all along: the task leads its process
 * group, and the agent signals it directly.
 */
export function sandboxArgv(o: {
  exe: string;
  args: readonly string[];
  limits: TaskLimits;
  user?: SandboxUser;
  dropBoundingSet?: boolean;
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
  return {
    cmd: PRLIMIT,
    args: [...limits, "--", SETPRIV, ...priv, "--", o.exe, ...o.args],
  };
}
