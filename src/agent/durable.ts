/**
 * Durable small-file writes for the agent's state (task ids, running tasks, outbound queue).
 *
 * `writeFileDurable` = write a temp file with a name no other writer uses, fsync it, rename it
 * over the target, fsync the directory. After it resolves, the new content survives a crash or
 * a power cut; before, the old content does. A concurrent reader sees one or the other, never a
 * mix.
 */
import { dirname } from "node:path";

let tmpCounter = 0;

/** fsync of a directory: makes the renames and unlinks in it durable. */
export async function syncDir(dir: string): Promise<void> {
  const d = await Deno.open(dir, { read: true });
  try {
    await d.sync();
  } finally {
    d.close();
  }
}

/** Replaces `path` with `data` durably (mode 0600). Removes its temp file when it fails. */
export async function writeFileDurable(path: string, data: string | Uint8Array): Promise<void> {
  const dir = dirname(path);
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  const tmp = `${path}.tmp-${Deno.pid}-${++tmpCounter}`;
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  try {
    const f = await Deno.open(tmp, { write: true, createNew: true, mode: 0o600 });
    try {
      let off = 0;
      while (off < bytes.byteLength) off += await f.write(bytes.subarray(off));
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

/** True for the temp files `writeFileDurable` leaves behind when a crash interrupts it. */
export function isDurableTemp(name: string): boolean {
  return /\.tmp-\d+-\d+$/.test(name);
}
