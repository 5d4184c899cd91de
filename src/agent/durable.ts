/**
 * Durable small-file writes for the agent's state (task ids, running tasks, outbound queue).
 *
 * `writeFileDurable` = `writeFileAtomic` (src/fs/atomic.ts) with mode 0600: write a temp file
 * with a name no other writer uses, fsync it, rename it over the target, fsync the directory.
 * After it resolves, the new content survives a crash or a power cut; before, the old content
 * does. A concurrent reader sees one or the other, never a mix.
 */
import { dirname } from "node:path";
import { isAtomicTemp, syncDir, writeFileAtomic } from "../fs/atomic.ts";

export { syncDir };

/** Replaces `path` with `data` durably (mode 0600). Removes its temp file when it fails. */
export function writeFileDurable(path: string, data: string | Uint8Array): Promise<void> {
  return writeFileAtomic(path, data, 0o600, 0o700);
}

/** Removes `path` durably; a missing file is fine. */
export async function removeDurable(path: string): Promise<void> {
  try {
    await Deno.remove(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return;
    throw err;
  }
  await syncDir(dirname(path));
}

/**
 * True for the temp files `writeFileDurable` leaves behind when a crash interrupts it (also
 * the `.tmp-<pid>-<counter>` names older versions of the agent left).
 */
export function isDurableTemp(name: string): boolean {
  return isAtomicTemp(name);
}
