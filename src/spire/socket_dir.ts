/**
 * The one check of a Workload API socket directory, for the SPIRE agent k8s4r supervises (which
 * creates it) and for the k8s4r agent connecting to a SPIRE agent it does not manage.
 *
 * Whoever can replace the socket can serve the agent a forged SVID and bundle. So the directory
 * must belong to this user or to root, and nobody else may write to it (no group or other write
 * bit); every directory above it must belong to this user or root too, and may be writable by
 * others only with the sticky bit (like /tmp: then nobody else can rename or remove our
 * directory). Symbolic links on the way must belong to this user or root, and the directory
 * they lead to is checked the same way. A squatted `/tmp/spire-agent` (made first by another
 * user) is therefore refused, never used.
 *
 * A directory that does not exist is created (when asked) one level at a time, each 0700 first
 * and then opened to 0755, so it is never writable by others, whatever the umask.
 */
import { dirname, isAbsolute, join } from "node:path";
import { CliError } from "../cli/errors.ts";

/** Longest unix socket path Linux accepts (sun_path is 108 bytes including the NUL). */
export const MAX_SOCKET_PATH = 107;

export class SocketDirError extends CliError {
  constructor(message: string, hint: string) {
    super(message, 1, hint);
    this.name = "SocketDirError";
  }
}

const mode8 = (m: number) => (m & 0o7777).toString(8).padStart(4, "0");

function prefixes(dir: string): string[] {
  const out = ["/"];
  let cur = "";
  for (const part of dir.split("/").filter((p) => p !== "")) {
    cur = `${cur}/${part}`;
    out.push(cur);
  }
  return out;
}

/** What the check reads of a path (an lstat): the doctor passes its own file system here. */
export interface SocketDirStat {
  uid?: number | null;
  isDirectory: boolean;
  isSymlink: boolean;
  mode?: number | null;
}

export interface SocketDirFs {
  /** lstat; undefined when the path does not exist. */
  lstat(path: string): Promise<SocketDirStat | undefined>;
  realPath(path: string): Promise<string>;
}

async function lstat(p: string): Promise<Deno.FileInfo | undefined> {
  try {
    return await Deno.lstat(p);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
}

const denoFs: SocketDirFs = { lstat, realPath: (p) => Deno.realPath(p) };

async function createDirs(dir: string): Promise<void> {
  for (const p of prefixes(dir)) {
    if (await lstat(p)) continue;
    try {
      await Deno.mkdir(p, { mode: 0o700 });
    } catch (err) {
      if (err instanceof Deno.errors.AlreadyExists) continue; // someone was first: checked below
      throw err;
    }
    // 0755: workloads of other users must reach the socket (and get PermissionDenied from the
    // Workload API when no entry selects them), but must not replace it.
    await Deno.chmod(p, 0o755);
  }
}

/**
 * Checks the directory of `socketPath` (and, with `create`, makes it first). Throws a
 * SocketDirError naming the directory, its owner or mode, and what to do.
 */
export async function secureSocketDir(
  socketPath: string,
  opts: { create: boolean; what?: string; uid?: number; fs?: SocketDirFs },
): Promise<void> {
  const fs = opts.fs ?? denoFs;
  if (opts.create && opts.fs) throw new Error("secureSocketDir: create works on the real fs only");
  const what = opts.what ?? "SPIRE agent socket";
  const uid = opts.uid ?? Deno.uid() ?? 0;
  if (new TextEncoder().encode(socketPath).length > MAX_SOCKET_PATH) {
    throw new CliError(
      `${what} path is too long (${socketPath.length} > ${MAX_SOCKET_PATH} bytes): ${socketPath}`,
      2,
      "use a shorter directory, e.g. /run/k8s4r/ or /tmp/spire-agent/",
    );
  }
  if (!isAbsolute(socketPath)) {
    throw new CliError(`${what} path must be absolute, got ${socketPath}`, 2);
  }
  const dir = dirname(socketPath);
  if (opts.create) {
    try {
      await createDirs(dir);
    } catch (err) {
      throw new SocketDirError(
        `cannot create the ${what} directory ${dir}: ${(err as Error).message}`,
        dir.startsWith("/run/")
          ? `create it for this user first (as root: install -d -m 0755 -o ${uid} ${dir}; systemd: RuntimeDirectory=)`
          : "choose a directory this user may create",
      );
    }
  }
  await checkDirChain(fs, dir, uid, what, new Set());
}

async function checkDirChain(
  fs: SocketDirFs,
  dir: string,
  uid: number,
  what: string,
  seen: Set<string>,
) {
  if (seen.has(dir)) return;
  seen.add(dir);
  const trusted = (owner: number | null | undefined) => owner === uid || owner === 0;
  const all = prefixes(dir);
  for (const p of all) {
    const st = await fs.lstat(p);
    const isLast = p === all[all.length - 1];
    if (!st) {
      throw new SocketDirError(
        `${what} directory ${dir} does not exist${p !== dir ? ` (${p} is missing)` : ""}`,
        "is the SPIRE agent running? Its socket directory must exist and belong to its user",
      );
    }
    if (!trusted(st.uid)) {
      throw new SocketDirError(
        `${what} directory ${
          p === dir ? dir : `${dir}: ${p}`
        } belongs to uid ${st.uid}, not to this user (uid ${uid}) or root: whoever owns it can replace the socket and serve a forged SVID and bundle`,
        `remove ${p} (someone else may have created it to intercept the identity) or set another socket path (spire.socketPath, --socket)`,
      );
    }
    if (st.isSymlink) {
      const target = await fs.realPath(p);
      const rest = dir.slice(p.length);
      await checkDirChain(fs, rest ? join(target, rest) : target, uid, what, seen);
      return;
    }
    if (!st.isDirectory) {
      throw new SocketDirError(`${what} directory ${dir}: ${p} is not a directory`, "fix the path");
    }
    const m = st.mode ?? 0;
    if (isLast) {
      if ((m & 0o022) !== 0) {
        throw new SocketDirError(
          `${what} directory ${dir} is writable by ${
            (m & 0o020) && (m & 0o002) ? "group and others" : (m & 0o020) ? "its group" : "others"
          } (mode ${mode8(m)}): they could replace the socket`,
          `chmod go-w ${dir}`,
        );
      }
    } else if ((m & 0o022) !== 0 && (m & 0o1000) === 0) {
      throw new SocketDirError(
        `${what} directory ${dir}: ${p} is writable by ${
          (m & 0o002) ? "others" : "its group"
        } without the sticky bit (mode ${mode8(m)}): they could replace ${dir}`,
        `chmod go-w ${p}, or put the socket elsewhere`,
      );
    }
  }
}
