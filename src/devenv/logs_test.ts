import assert from "node:assert/strict";
import { Args } from "../cli/mod.ts";
import { bufferIo } from "../cli/io.ts";
import { UsageError } from "../cli/errors.ts";
import { resolveContext } from "./context.ts";
import { devenvLogs, logSources, selectSources } from "./logs.ts";

function ctxFor(dir: string, signal?: AbortSignal) {
  const io = bufferIo({ cwd: dir, signal });
  const args = new Args(["devenv", "logs"], new Map(), [], []);
  return { io, ctx: resolveContext(args, io) };
}

Deno.test("logs: tails each component with an aligned prefix, no colour when piped", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.mkdir(`${dir}/.dev-env`);
    await Deno.writeTextFile(`${dir}/.dev-env/server.log`, "s1\ns2\ns3\n");
    await Deno.writeTextFile(`${dir}/.dev-env/spire-server.log`, "a\nb");
    const { io, ctx } = ctxFor(dir);
    assert.equal(await devenvLogs(ctx, ["server", "spire-server"], false, 2), 0);
    assert.equal(
      io.out(),
      "server       | s2\nserver       | s3\nspire-server | a\nspire-server | b\n",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("logs: unknown component is a usage error with a suggestion", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { ctx } = ctxFor(dir);
    assert.throws(() => selectSources(logSources(ctx), ["sever"]), (e: unknown) => {
      assert.ok(e instanceof UsageError);
      assert.match(e.message, /did you mean 'server'/);
      return true;
    });
    assert.deepEqual(logSources(ctx).map((s) => s.name).slice(0, 5), [
      "spire-server",
      "broker-identity",
      "spire-agent-broker",
      "mosquitto",
      "server",
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("logs -f: prints complete new lines until the signal fires", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.mkdir(`${dir}/.dev-env`);
    const file = `${dir}/.dev-env/mosquitto.log`;
    await Deno.writeTextFile(file, "old\n");
    const ac = new AbortController();
    const { io, ctx } = ctxFor(dir, ac.signal);
    const until = async (want: string) => {
      for (let i = 0; i < 200 && !io.out().includes(want); i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.ok(io.out().includes(want), `no "${want}" in: ${JSON.stringify(io.out())}`);
    };
    const done = devenvLogs(ctx, ["mosquitto"], true, 1);
    // The follow offset is recorded before the tail is printed: once "old" is out, an append is
    // new content for the follower (appending earlier would race with that offset).
    await until("old");
    await Deno.writeTextFile(file, "new 1\nhalf", { append: true });
    await until("new 1");
    await Deno.writeTextFile(file, " line\n", { append: true });
    await until("half line");
    ac.abort();
    assert.equal(await done, 0);
    assert.equal(io.out(), "mosquitto | old\nmosquitto | new 1\nmosquitto | half line\n");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
