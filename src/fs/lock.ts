/**
 * Read-modify-write of a file that several commands edit at once (`robot add`s, `operator add`
 * and `remove` on the roles file): an exclusive lock on `<file>.lock` (flock, held by the open
 * file description, so it also orders two edits inside one process) for the whole edit. The one
 * such helper. The lock file is 0600 and stays in place (removing it would race a waiter).
 */
import { dirname } from "node:path";

export async function withFileLock<T>(
  file: string,
  fn: () => Promise<T>,
  opts: { dirMode?: number } = {},
): Promise<T> {
  await Deno.mkdir(dirname(file), { recursive: true, mode: opts.dirMode ?? 0o700 });
  const lock = await Deno.open(`${file}.lock`, { create: true, write: true, mode: 0o600 });
  try {
    await lock.lock(true);
    return await fn();
  } finally {
    lock.close(); // releases the lock
  }
}
