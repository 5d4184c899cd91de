/**
 * The unprivileged user tasks run as (`tasks.user`, optionally `tasks.group`). Its uid must match
 * no SPIRE registration entry, so that a task asking the Workload API for an identity gets
 * PermissionDenied: the robot's SVID and key stay with the agent.
 *
 * - `resolveTaskUser` (agent start): looks the user up (NSS, through `getent`), checks it is not
 *   root nor the agent's own uid, and that the agent can switch to it; otherwise a CliError that
 *   says what to do. The agent then refuses to start: it never falls back to running tasks as
 *   itself.
 * - `ensureTaskUser` (devenv, provisioning; as root): creates the user with
 *   `useradd --system` when it does not exist yet. Idempotent. `removeTaskUser` undoes it.
 */
import { CliError } from "../cli/errors.ts";
import { type ProcessRunner, waitFor } from "../process/mod.ts";

export interface TaskUser {
  name: string;
  uid: number;
  gid: number;
  /** From the passwd entry (tasks get it as HOME). */
  home: string;
  /** The agent may also drop the capability bounding set (CAP_SETPCAP). */
  dropBoundingSet: boolean;
}

/** The default name devenv (and the docs) use for the task user. */
export const DEFAULT_TASK_USER = "k8s4r-task";

const NAME_RE = /^[a-z_][a-z0-9_-]{0,31}$/;

interface PasswdEntry {
  name: string;
  uid: number;
  gid: number;
  home: string;
}

/** `getent passwd NAME` (NSS: files, LDAP, ...). Undefined when there is no such user. */
export async function lookupUser(
  runner: ProcessRunner,
  name: string,
): Promise<PasswdEntry | undefined> {
  const r = await runner.output("getent", ["passwd", name], { check: false, timeoutMs: 10_000 });
  if (r.code === 2) return undefined; // "key could not be found"
  if (!r.success) throw new Error(`getent passwd ${name} failed (exit ${r.code}): ${r.stderr}`);
  const f = r.stdout.trim().split("\n")[0].split(":");
  if (f.length < 7) throw new Error(`getent passwd ${name}: unexpected output ${r.stdout}`);
  return { name: f[0], uid: Number(f[2]), gid: Number(f[3]), home: f[5] };
}

/** `getent group NAME`: the gid, or undefined. */
export async function lookupGroup(
  runner: ProcessRunner,
  name: string,
): Promise<number | undefined> {
  const r = await runner.output("getent", ["group", name], { check: false, timeoutMs: 10_000 });
  if (r.code === 2) return undefined;
  if (!r.success) throw new Error(`getent group ${name} failed (exit ${r.code}): ${r.stderr}`);
  return Number(r.stdout.trim().split(":")[2]);
}

/** Capability sets of this process from /proc/self/status. */
export function capabilities(
  status = Deno.readTextFileSync("/proc/self/status"),
): { effective: bigint; ambient: bigint } {
  const get = (k: string) =>
    BigInt("0x" + (new RegExp(`^${k}:\\s*([0-9a-f]+)`, "m").exec(status)?.[1] ?? "0"));
  return { effective: get("CapEff"), ambient: get("CapAmb") };
}

const CAP_KILL = 5n;
const CAP_SETGID = 6n;
const CAP_SETUID = 7n;
const CAP_SETPCAP = 8n;
const has = (set: bigint, cap: bigint) => (set >> cap & 1n) === 1n;

/**
 * Whether this process may empty the capability bounding set of what it starts (CAP_SETPCAP):
 * then a task has no capability even when it runs as root.
 */
export function canDropBoundingSet(caps = capabilities()): boolean {
  return has(caps.effective, CAP_SETPCAP);
}

/**
 * Whether this process can start tasks as another user: as root with CAP_SETUID, CAP_SETGID and
 * CAP_KILL effective; otherwise it needs CAP_KILL effective (to signal the tasks) and CAP_SETUID
 * and CAP_SETGID as AMBIENT capabilities (those survive the exec of prlimit and setpriv; e.g.
 * systemd's AmbientCapabilities=). Returns what is missing.
 */
export function switchUserMissing(
  uid = Deno.uid(),
  caps = capabilities(),
): string[] {
  const missing: string[] = [];
  if (!has(caps.effective, CAP_KILL)) missing.push("CAP_KILL");
  const carry = uid === 0 ? caps.effective : caps.ambient;
  if (!has(carry, CAP_SETUID)) missing.push(uid === 0 ? "CAP_SETUID" : "CAP_SETUID (ambient)");
  if (!has(carry, CAP_SETGID)) missing.push(uid === 0 ? "CAP_SETGID" : "CAP_SETGID (ambient)");
  return missing;
}

/**
 * Resolves `tasks.user` / `tasks.group` for the agent. Throws a CliError naming the problem and
 * the fix when the user does not exist, is privileged or the agent's own, or when the agent
 * cannot switch to it.
 */
export async function resolveTaskUser(
  runner: ProcessRunner,
  user: string,
  group?: string,
  self = { uid: Deno.uid(), caps: capabilities() },
): Promise<TaskUser> {
  const e = await lookupUser(runner, user); // a name or a numeric uid
  if (!e) {
    throw new CliError(
      `tasks.user ${JSON.stringify(user)}: no such user`,
      1,
      `create it (as root): useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin --user-group ${
        NAME_RE.test(user) ? user : DEFAULT_TASK_USER
      }`,
    );
  }
  if (e.uid === 0) {
    throw new CliError(`tasks.user ${JSON.stringify(user)} is root: tasks must run unprivileged`);
  }
  if (e.uid === self.uid) {
    throw new CliError(
      `tasks.user ${
        JSON.stringify(user)
      } is the agent's own uid ${e.uid}: the robot's registration entry selects that uid, so tasks could fetch its SVID`,
      1,
      "use a dedicated user whose uid no registration entry selects",
    );
  }
  let gid = e.gid;
  if (group !== undefined) {
    const g = /^\d+$/.test(group) ? Number(group) : await lookupGroup(runner, group);
    if (g === undefined) throw new CliError(`tasks.group ${JSON.stringify(group)}: no such group`);
    gid = g;
  }
  if (gid === 0) {
    throw new CliError(
      `tasks.group of ${JSON.stringify(user)} is gid 0: tasks must run unprivileged`,
    );
  }
  const missing = switchUserMissing(self.uid, self.caps);
  if (missing.length > 0) {
    throw new CliError(
      `tasks.user is set, but the agent (uid ${self.uid}) cannot start tasks as ${user}: it lacks ${
        missing.join(", ")
      }`,
      1,
      "run the agent as root, or grant it the capabilities (systemd: AmbientCapabilities=CAP_SETUID CAP_SETGID CAP_KILL)",
    );
  }
  return {
    name: e.name,
    uid: e.uid,
    gid,
    home: e.home,
    dropBoundingSet: canDropBoundingSet(self.caps),
  };
}

/**
 * An agent running as root that may run tasks (a non-empty `tasks.allow`) must run them as
 * `tasks.user`: otherwise every task runs as root, reading and writing every file (even with
 * no capability, uid 0 owns them). Throws a one-line CliError naming the file and `tasks.user`.
 */
export function requireTaskUser(
  tasks: { allow: readonly string[]; user?: string },
  file: string | undefined,
  uid = Deno.uid(),
): void {
  if (uid !== 0 || tasks.allow.length === 0 || tasks.user !== undefined) return;
  const where = file ?? "the agent's config";
  throw new CliError(
    `${where}: tasks.user: not set, but tasks.allow lets tasks run and the agent runs as root: they would run as root; set tasks.user to an unprivileged user`,
    1,
    `add "  user: ${DEFAULT_TASK_USER}" under tasks: in ${where} (create the user as root: useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin --user-group ${DEFAULT_TASK_USER}), or empty tasks.allow`,
  );
}

/**
 * Creates the system user `name` (and its group) when it does not exist; returns it either way.
 * Needs root. `useradd --system`: no home, no login shell, a uid from the system range that no
 * SPIRE entry selects unless someone registers it.
 */
export async function ensureTaskUser(
  runner: ProcessRunner,
  name = DEFAULT_TASK_USER,
): Promise<{ name: string; uid: number; gid: number; created: boolean }> {
  if (!NAME_RE.test(name)) {
    throw new CliError(
      `task user name ${JSON.stringify(name)}: expected [a-z_][a-z0-9_-]{0,31}`,
      2,
    );
  }
  const existing = await lookupUser(runner, name);
  if (existing) return { ...existing, created: false };
  await runner.output("useradd", [
    "--system",
    "--no-create-home",
    "--home-dir",
    "/nonexistent",
    "--shell",
    "/usr/sbin/nologin",
    "--user-group",
    name,
  ], { timeoutMs: 30_000 });
  const made = await lookupUser(runner, name);
  if (!made) throw new Error(`useradd ${name} succeeded, but getent passwd ${name} finds nothing`);
  return { ...made, created: true };
}

/**
 * Removes the user (and its group) `ensureTaskUser` created. A missing user is fine. userdel
 * refuses (exit 8) while a process of the user exists, zombies included, and PID 1 may take a
 * moment to reap a task that just ended: retried for up to `timeoutMs`.
 */
export async function removeTaskUser(
  runner: ProcessRunner,
  name: string,
  timeoutMs = 10_000,
): Promise<void> {
  if (!(await lookupUser(runner, name))) return;
  let last = "";
  await waitFor(async () => {
    const r = await runner.output("userdel", [name], { check: false, timeoutMs: 30_000 });
    if (r.success) return true;
    last = `userdel ${name} failed (exit ${r.code}): ${r.stderr.trim()}`;
    return false;
  }, { timeoutMs, intervalMs: 100, what: `userdel ${name}` }).catch((err) => {
    throw new Error(last || (err as Error).message);
  });
  if ((await lookupGroup(runner, name)) !== undefined) {
    await runner.output("groupdel", [name], { check: false, timeoutMs: 30_000 });
  }
}
