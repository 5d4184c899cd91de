/**
 * Writing a file so that nobody ever sees it half-written or with a wider mode than asked for:
 * a temp file in the same directory with the final mode, then a rename. For secrets (keys,
 * passwords: 0600) and for files other processes read while they change (certificates). The
 * one such helper: production code and devenv both use it.
 */
import { dirname } from "node:path";

export async function writeFileAtomic(
  path: string,
  data: string | Uint8Array,
  mode: number,
  dirMode = 0o700,
): Promise<void> {
  await Deno.mkdir(dirname(path), { recursive: true, mode: dirMode });
  const tmp = `${path}.tmp-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
  try {
    if (typeof data === "string") await Deno.writeTextFile(tmp, data, { mode });
    else await Deno.writeFile(tmp, data, { mode });
    await Deno.chmod(tmp, mode); // the umask may have narrowed it; never widened
    await Deno.rename(tmp, path);
  } catch (err) {
    await Deno.remove(tmp).catch(() => {});
    throw err;
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
