import assert from "node:assert/strict";
import { join } from "node:path";
import { secureSocketDir, SocketDirError } from "./socket_dir.ts";

/**
 * A directory owned by someone else: as root, chown it to nobody (65534); otherwise check it as
 * if this process were another uid (the directory is then owned by a uid that is neither ours
 * nor root's).
 */
async function foreign(path: string): Promise<{ uid?: number }> {
  if (Deno.uid() === 0) {
    await Deno.chown(path, 65534, 65534);
    return {};
  }
  return { uid: 54321 };
}

async function withTmp(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-sd-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const refused = (p: Promise<unknown>, re: RegExp) =>
  assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof SocketDirError, String(err));
    assert.match((err as Error).message, re);
    return true;
  });

Deno.test("socket dir: created one level at a time, 0755; accepted when ours (control)", async () => {
  await withTmp(async (dir) => {
    await secureSocketDir(join(dir, "a", "b", "agent.sock"), { create: true });
    for (const d of [join(dir, "a"), join(dir, "a", "b")]) {
      assert.equal((Deno.statSync(d).mode ?? 0) & 0o7777, 0o755, d);
    }
    await secureSocketDir(join(dir, "a", "b", "agent.sock"), { create: false });
  });
});

Deno.test("socket dir: squatted by another user is refused (the /tmp/spire-agent attack)", async () => {
  await withTmp(async (dir) => {
    const squat = join(dir, "spire-agent");
    await Deno.mkdir(squat);
    await Deno.chmod(squat, 0o755); // not world-writable: accepted before issue 11
    const as = await foreign(squat);
    await refused(
      secureSocketDir(join(squat, "agent.sock"), { create: true, ...as }),
      /spire-agent belongs to uid \d+, not to this user .* or root: whoever owns it can replace the socket/,
    );
    await refused(
      secureSocketDir(join(squat, "agent.sock"), { create: false, ...as }),
      /belongs to uid/,
    );
  });
});

Deno.test("socket dir: group- or world-writable is refused; 0755 and 0700 are fine", async () => {
  await withTmp(async (dir) => {
    const d = join(dir, "s");
    await Deno.mkdir(d);
    const sock = join(d, "agent.sock");
    for (
      const [mode, re] of [[0o775, /writable by its group \(mode 0775\)/], [
        0o757,
        /writable by others/,
      ], [0o1777, /writable by group and others/]] as const
    ) {
      await Deno.chmod(d, mode);
      await refused(secureSocketDir(sock, { create: true }), re);
    }
    for (const mode of [0o755, 0o700, 0o750]) {
      await Deno.chmod(d, mode);
      await secureSocketDir(sock, { create: false });
    }
  });
});

Deno.test("socket dir: an ancestor writable by others needs the sticky bit (as /tmp has)", async () => {
  await withTmp(async (dir) => {
    const parent = join(dir, "p");
    await Deno.mkdir(join(parent, "s"), { recursive: true });
    await Deno.chmod(join(parent, "s"), 0o755);
    await Deno.chmod(parent, 0o777);
    await refused(
      secureSocketDir(join(parent, "s", "agent.sock"), { create: false }),
      /p is writable by others without the sticky bit \(mode 0777\)/,
    );
    await Deno.chmod(parent, 0o1777);
    await secureSocketDir(join(parent, "s", "agent.sock"), { create: false });
  });
});

Deno.test("socket dir: symlinks must be ours and lead to a directory that passes too", async () => {
  await withTmp(async (dir) => {
    const good = join(dir, "good");
    const bad = join(dir, "bad");
    await Deno.mkdir(good);
    await Deno.chmod(good, 0o755);
    await Deno.mkdir(bad);
    await Deno.chmod(bad, 0o777);
    await Deno.symlink(good, join(dir, "to-good"));
    await Deno.symlink(bad, join(dir, "to-bad"));
    await secureSocketDir(join(dir, "to-good", "agent.sock"), { create: false });
    await refused(
      secureSocketDir(join(dir, "to-bad", "agent.sock"), { create: false }),
      /bad is writable by group and others/,
    );
    if (Deno.uid() === 0) {
      // A link owned by someone else could be pointed elsewhere at any time.
      const link = join(dir, "their-link");
      await Deno.symlink(good, link);
      const { lchown } = await import("node:fs/promises");
      await lchown(link, 65534, 65534);
      await refused(
        secureSocketDir(join(link, "agent.sock"), { create: false }),
        /belongs to uid 65534/,
      );
    }
  });
});

Deno.test("socket dir: missing (check only), relative or too long is a clear error", async () => {
  await withTmp(async (dir) => {
    await refused(
      secureSocketDir(join(dir, "nope", "agent.sock"), { create: false }),
      /nope does not exist/,
    );
    await assert.rejects(secureSocketDir("rel/agent.sock", { create: true }), /must be absolute/);
    await assert.rejects(
      secureSocketDir(join(dir, "x".repeat(120), "agent.sock"), { create: true }),
      /path is too long/,
    );
  });
});
