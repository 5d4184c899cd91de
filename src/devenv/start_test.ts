import assert from "node:assert/strict";
import { Args } from "../cli/mod.ts";
import { bufferIo } from "../cli/io.ts";
import { UsageError } from "../cli/errors.ts";
import { resolveContext } from "./context.ts";
import { resolveMode } from "./start.ts";

Deno.test("resolveMode: --ha implies --root-ca; a saved mode is kept; switching an existing stack is a usage error", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const ctx = resolveContext(new Args([], new Map(), [], []), bufferIo({ cwd: dir }));
    // A new stack takes the flags.
    assert.deepEqual(resolveMode(ctx, undefined, {}), { ha: false, rootCa: false });
    assert.deepEqual(resolveMode(ctx, undefined, { ha: true }), { ha: true, rootCa: true });
    assert.deepEqual(resolveMode(ctx, undefined, { rootCa: true }), { ha: false, rootCa: true });
    // A saved HA stack resumes without the flag.
    const ha = { robots: [], mode: { ha: true, rootCa: true }, createdSocketDirs: [], env: {} };
    assert.deepEqual(resolveMode(ctx, ha, {}), { ha: true, rootCa: true });
    // A plain stack with SPIRE data cannot become HA or move under a root CA.
    const plain = {
      robots: [],
      mode: { ha: false, rootCa: false },
      createdSocketDirs: [],
      env: {},
    };
    assert.throws(() => resolveMode(ctx, plain, { ha: true }), (e: UsageError) => {
      assert.equal(e.exitCode, 2);
      assert.match(e.message, /--ha: this stack .* runs without it/);
      assert.match(e.hint ?? "", /devenv clean/);
      return true;
    });
    // No state file, but SPIRE data from an older devenv: that is a plain stack.
    await Deno.mkdir(`${dir}/.spire-data/server`, { recursive: true });
    await Deno.writeTextFile(`${dir}/.spire-data/server/datastore.sqlite3`, "");
    assert.throws(() => resolveMode(ctx, undefined, { rootCa: true }), /--root-ca/);
    assert.throws(() => resolveMode(ctx, undefined, { ha: true }), /--ha/);
    assert.deepEqual(resolveMode(ctx, undefined, {}), { ha: false, rootCa: false });
    // ... under the root CA when its upstream CA is there (a restored backup of such a stack).
    await Deno.mkdir(`${dir}/.spire-data/ca`, { recursive: true });
    await Deno.writeTextFile(`${dir}/.spire-data/ca/upstream.crt`, "");
    assert.deepEqual(resolveMode(ctx, undefined, {}), { ha: false, rootCa: true });
    assert.deepEqual(resolveMode(ctx, undefined, { rootCa: true }), { ha: false, rootCa: true });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
