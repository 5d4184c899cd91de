/**
 * The SPIRE server's admin socket grants full control of the server (mint any SVID, read and
 * change every entry). Its directory is checked like a Workload API socket's (socket_dir.ts):
 * this user's or root's, not writable by group or others. Directories owned by someone else are
 * made by chown to nobody, so these tests need root (CI runs as root); otherwise they fail.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { RecordingRunner } from "../process/mod.ts";
import { renderServerConfig, spireAdminCli, SpireServerCli, startSpireServer } from "./server.ts";
import { SocketDirError } from "./socket_dir.ts";
import { bufferIo } from "../cli/io.ts";

function needRoot() {
  if (Deno.uid() !== 0) throw new Error("chowns a directory to another user: run as root");
}

async function withTmp(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-admin-sock-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("spireAdminCli: a socket directory someone else owns, or others may write, is refused; ours is used", async () => {
  needRoot();
  await withTmp(async (dir) => {
    const runner = new RecordingRunner();
    const squat = join(dir, "spire-server", "private");
    await Deno.mkdir(squat, { recursive: true, mode: 0o700 });
    await Deno.chown(squat, 65534, 65534);
    await assert.rejects(
      spireAdminCli(runner, "/bin/spire-server", join(squat, "api.sock")),
      (e: Error) =>
        e instanceof SocketDirError && /belongs to uid 65534, not to this user/.test(e.message),
    );
    await Deno.chown(squat, 0, 0);
    await Deno.chmod(squat, 0o777);
    await assert.rejects(
      spireAdminCli(runner, "/bin/spire-server", join(squat, "api.sock")),
      /SPIRE server admin socket directory .* is writable by group and others \(mode 0777\)/,
    );
    // The control: the same directory, ours and 0700.
    await Deno.chmod(squat, 0o700);
    const cli = await spireAdminCli(runner, "/bin/spire-server", join(squat, "api.sock"));
    assert.ok(cli instanceof SpireServerCli);
    assert.deepEqual(runner.calls, [], "a check runs nothing");
  });
});

Deno.test("startSpireServer: an existing socket directory someone else made is refused before spire-server starts", async () => {
  needRoot();
  await withTmp(async (dir) => {
    const conf = join(dir, "server.conf");
    await Deno.writeTextFile(conf, renderServerConfig());
    const squat = join(dir, "s");
    await Deno.mkdir(squat, { mode: 0o700 });
    await Deno.chown(squat, 65534, 65534);
    const runner = new RecordingRunner();
    const io = bufferIo({ cwd: dir, runner });
    const opts = {
      bin: "/bin/spire-server",
      configFile: conf,
      cwd: dir,
      logFile: join(dir, "log"),
      socketPath: join(squat, "api.sock"),
    };
    await assert.rejects(startSpireServer(io, opts), /belongs to uid 65534/);
    assert.deepEqual(runner.calls, [], "spire-server was started on a squatted socket directory");
    // The control: a directory it makes itself (0700) starts it.
    const d = await startSpireServer(io, { ...opts, socketPath: join(dir, "own", "api.sock") });
    assert.equal(runner.calls.length, 1);
    assert.equal(Deno.statSync(join(dir, "own")).mode! & 0o777, 0o700);
    await d.stop();
  });
});
