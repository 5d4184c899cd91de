/**
 * Writing a file so that nobody ever sees it half-written or with a wider mode than asked for,
 * and a crash or power loss leaves the old file or the new one: a new temp file in the same
 * directory (created exclusively, with the final mode), written and fsynced, renamed over the
 * path, then the directory fsynced (the rename itself is durable). For secrets (keys,
 * passwords: 0600) and for files other processes read while they change (certificates, the
 * roles file). The one such helper: production code and devenv both use it.
 */
import { basename, dirname, join } from "node:path";

/** A temp file's name beside `path` that no other writer uses: `<path>.tmp-<pid>-<hex>`. */
function tempName(path: string): string {
  return `${path}.tmp-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
}

/**
 * True for a name `writeFileAtomic` gives its temp files (what a crash in the middle leaves
 * behind), so that whoever owns the directory can remove them at start.
 */
export function isAtomicTemp(name: string): boolean {
  return /\.tmp-\d+-[0-9a-f]+$/.test(name);
}

export async function writeFileAtomic(
  path: string,
  data: string | Uint8Array,
  mode: number,
  dirMode = 0o700,
): Promise<void> {
  const dir = dirname(path);
  await Deno.mkdir(dir, { recursive: true, mode: dirMode });
  const tmp = tempName(path);
  try {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    const f = await Deno.open(tmp, { write: true, createNew: true, mode });
    try {
      for (let off = 0; off < bytes.byteLength;) off += await f.write(bytes.subarray(off));
      await Deno.chmod(tmp, mode); // the umask may have narrowed it; never widened
      await f.sync();
    } finally {
      f.close();
    }
    await Deno.rename(tmp, path);
  } catch (err) {
    await Deno.remove(tmp).catch(() => {});
    throw err;
  }
  await syncDir(dir);
}

/** fsync of a directory: what makes a rename or a new entry in it survive a power loss. */
export async function syncDir(dir: string): Promise<void> {
  const d = await Deno.open(dir, { read: true });
  try {
    await d.sync();
  } finally {
    d.close();
  }
}

/** Permission bits of a file, or undefined when it does not exist. */
export function fileMode(path: string): number | undefined {
  try {
    return (Deno.statSync(path).mode ?? 0) & 0o7777;
  } catch {
    return undefined;
  }
}

export interface PairFile {
  path: string;
  data: string | Uint8Array;
  mode: number;
}

/** Writes one file of a pair's new version (the seam a test uses to fail the second one). */
export type PairFileWriter = (
  path: string,
  data: string | Uint8Array,
  mode: number,
) => Promise<void>;

/**
 * Replaces two files that must always match (a certificate and its key) so that whoever opens
 * them sees the old pair or the new pair, never one of each, whatever fails or crashes when:
 *
 *   a.path -> .<a>.pair/current/<a>      (symlinks, made once)
 *   b.path -> .<a>.pair/current/<b>
 *   .<a>.pair/current -> v-<id>          (the one pointer: replaced by a rename)
 *
 * Each version directory gets both files before `current` is switched to it. Readers (Mosquitto
 * on SIGHUP, SPIRE's disk UpstreamAuthority) open the paths as before and follow the links. A
 * path that is still a regular file (the first write) is first moved, with its partner, into a
 * version of its own, so that even that migration never shows a mismatched pair. Versions older
 * than the previous one are removed. Both paths must be in the same directory.
 */
export async function writeFilePairAtomic(
  a: PairFile,
  b: PairFile,
  opts: { dirMode?: number; writeFile?: PairFileWriter } = {},
): Promise<void> {
  const dir = dirname(a.path);
  if (dirname(b.path) !== dir || a.path === b.path) {
    throw new Error(
      `writeFilePairAtomic: ${a.path} and ${b.path} must be two files of one directory`,
    );
  }
  const dirMode = opts.dirMode ?? 0o700;
  const write: PairFileWriter = opts.writeFile ??
    ((p, d, m) => writeFileAtomic(p, d, m, dirMode));
  const nameA = basename(a.path);
  const nameB = basename(b.path);
  const store = join(dir, `.${nameA}.pair`);
  const current = join(store, "current");
  await Deno.mkdir(store, { recursive: true, mode: dirMode });

  const newVersion = async (files: { name: string; data: Uint8Array | string; mode: number }[]) => {
    const v = `v-${Date.now().toString(36)}-${crypto.randomUUID().slice(0, 8)}`;
    await Deno.mkdir(join(store, v), { mode: dirMode });
    for (const f of files) await write(join(store, v, f.name), f.data, f.mode);
    return v;
  };
  const linkAtomic = async (target: string, at: string) => {
    const tmp = tempName(at);
    await Deno.symlink(target, tmp);
    try {
      await Deno.rename(tmp, at);
    } catch (err) {
      await Deno.remove(tmp).catch(() => {});
      throw err;
    }
  };
  const isLinkInto = async (p: string, name: string) => {
    try {
      const st = await Deno.lstat(p);
      return st.isSymlink && (await Deno.readLink(p)) === join(`.${nameA}.pair`, "current", name);
    } catch {
      return false;
    }
  };

  // First time: what is there (a matching pair, or nothing) becomes a version of its own, and
  // both paths become links to `current`: every step shows the same, old pair.
  const linked = (await isLinkInto(a.path, nameA)) && (await isLinkInto(b.path, nameB));
  if (!linked) {
    const old: { name: string; data: Uint8Array; mode: number }[] = [];
    for (const [p, name] of [[a.path, nameA], [b.path, nameB]]) {
      try {
        const st = await Deno.stat(p);
        if (st.isFile) {
          old.push({ name, data: await Deno.readFile(p), mode: (st.mode ?? 0o600) & 0o777 });
        }
      } catch (err) {
        if (!(err instanceof Deno.errors.NotFound)) throw err;
      }
    }
    if (old.length === 2) {
      const v = await newVersion(old);
      await linkAtomic(v, current);
    }
    // Each path, in turn, becomes a link to the same content it had: consistent at every step.
    await linkAtomic(join(`.${nameA}.pair`, "current", nameA), a.path);
    await linkAtomic(join(`.${nameA}.pair`, "current", nameB), b.path);
    await syncDir(dir);
  }

  const previous = await Deno.readLink(current).catch(() => undefined);
  const v = await newVersion([
    { name: nameA, data: a.data, mode: a.mode },
    { name: nameB, data: b.data, mode: b.mode },
  ]);
  await linkAtomic(v, current); // the switch: both files at once
  await syncDir(store);
  for await (const e of Deno.readDir(store)) {
    // The previous version stays until the next switch: a reader that resolved `current`
    // just before this one may still be opening its second file.
    if (e.isDirectory && e.name.startsWith("v-") && e.name !== v && e.name !== previous) {
      await Deno.remove(join(store, e.name), { recursive: true }).catch(() => {});
    }
  }
}
