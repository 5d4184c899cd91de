import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { realRunner } from "../process/mod.ts";
import { importLater } from "./import_later.ts";

const REPO = fileURLToPath(new URL("../../", import.meta.url));

/**
 * What Deno loads with a module before it runs: the modules reached through code imports, static
 * and literal dynamic ones (its module graph prefetches both), as `deno info --json` lists them.
 */
async function loadedWith(entry: string): Promise<string[]> {
  const r = await realRunner.output(Deno.execPath(), ["info", "--json", entry], {
    cwd: REPO,
    timeoutMs: 60_000,
  });
  const info = JSON.parse(r.stdout) as {
    roots: string[];
    modules: { specifier: string; dependencies?: { code?: { specifier: string } }[] }[];
  };
  const mods = new Map(info.modules.map((m) => [m.specifier, m]));
  const seen = new Set<string>();
  const todo = [...info.roots];
  while (todo.length) {
    const s = todo.pop()!;
    if (seen.has(s) || !mods.has(s)) continue;
    seen.add(s);
    for (const d of mods.get(s)!.dependencies ?? []) if (d.code) todo.push(d.code.specifier);
  }
  return [...seen].map((s) => s.startsWith("file://") ? s.slice(`file://${REPO}`.length) : s);
}

Deno.test("main.ts loads no command's modules before the command runs", async () => {
  // The CLI's frame and the process helper (cli/io.ts's runner); no command, no npm package.
  assert.deepEqual((await loadedWith("main.ts")).sort(), [
    "main.ts",
    "src/cli/commands.ts",
    "src/cli/errors.ts",
    "src/cli/import_later.ts",
    "src/cli/io.ts",
    "src/cli/mod.ts",
    "src/process/mod.ts",
    "src/version.ts",
  ]);
});

Deno.test("the agent's modules load neither the server's, devenv's nor the SPIRE tools'", async () => {
  const loaded = await loadedWith("src/agent/command.ts");
  assert.ok(loaded.includes("src/agent/mqtt_session.ts"), loaded.join("\n"));
  assert.ok(loaded.includes("src/spire/binaries.ts"), loaded.join("\n"));
  const foreign = loaded.filter((s) =>
    /^src\/(server|devenv|operator|control|backup)\//.test(s) ||
    s === "src/spire/embedded_tools.ts" || s.startsWith("npm:/pg@")
  );
  assert.deepEqual(foreign, []);
});

Deno.test("importLater imports the module when called", async () => {
  const m = await importLater<typeof import("../version.ts")>(
    new URL("../version.ts", import.meta.url),
  );
  assert.match(m.VERSION, /^\d+\.\d+\.\d+/);
});
