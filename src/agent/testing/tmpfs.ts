/**
 * Test support for full-disk faults: a REAL tmpfs of a few KiB (mount(8), root only: this machine
 * and CI run the tests as root), and a filler that takes all the space left in it. tmpfs counts
 * whole 4 KiB pages, so a file keeps the rest of its last page: an append that fits there
 * succeeds, one that crosses into a new page is written short, then fails ENOSPC (the torn line
 * a full disk leaves). Not used by production code.
 */
import { join } from "node:path";
import { realRunner } from "../../process/mod.ts";

export const PAGE = 4096;

/** Runs `fn` with a fresh tmpfs of `bytes` mounted at a temp dir; fails (saying why) without root. */
export async function withTmpfs(bytes: number, fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-tmpfs-" });
  const mount = await realRunner.output(
    "mount",
    ["-t", "tmpfs", "-o", `size=${bytes},mode=0700`, "k8s4r-test", dir],
    { check: false, timeoutMs: 10_000 },
  );
  if (!mount.success) {
    await Deno.remove(dir).catch(() => {});
    throw new Error(
      `cannot mount a ${bytes}-byte tmpfs at ${dir} (this test needs root and mount(8)): ${mount.stderr.trim()}`,
    );
  }
  try {
    await fn(dir);
  } finally {
    const um = await realRunner.output("umount", [dir], { check: false, timeoutMs: 10_000 });
    if (!um.success) {
      // Busy: a file in it is still open (a test that failed before closing it). Detach it all
      // the same (lazy), so that no mount outlives the test.
      await realRunner.output("umount", ["-l", dir], { check: false, timeoutMs: 10_000 });
    }
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Fills the file system of `dir` until ENOSPC; `free()` gives the space back. */
export async function fillDisk(dir: string): Promise<{ bytes: number; free(): Promise<void> }> {
  const path = join(dir, `filler-${crypto.randomUUID().slice(0, 8)}`);
  const f = await Deno.open(path, { write: true, createNew: true });
  let bytes = 0;
  try {
    const chunk = new Uint8Array(PAGE);
    for (;;) {
      try {
        bytes += await f.write(chunk);
      } catch (err) {
        if (/No space left|ENOSPC|os error 28/.test(String(err))) break;
        throw err;
      }
    }
  } finally {
    f.close();
  }
  return { bytes, free: () => Deno.remove(path) };
}

/** Gives back the space every `fillDisk` of `dir` took (also one made by another process). */
export async function freeDisk(dir: string): Promise<void> {
  for await (const e of Deno.readDir(dir)) {
    if (e.name.startsWith("filler-")) await Deno.remove(join(dir, e.name));
  }
}
