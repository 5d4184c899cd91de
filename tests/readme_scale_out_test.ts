/**
 * The README's "Scale out" and "Backup and restore" blocks stay runnable: every line parses with
 * the real command tree, runs on the control host, and the e2e files that run them read these
 * very blocks.
 */
import assert from "node:assert/strict";
import { loadCommandPath, resolve } from "../src/cli/mod.ts";
import { rootCommand } from "../src/cli/commands.ts";
import { readmeSteps } from "./helpers/readme_commands.ts";

for (
  const [block, e2e, wants] of [
    ["scale-out", "ha_test.ts", [/ca init/, /devenv start --ha/, /devenv status/, /doctor/]],
    ["backup", "backup_restore_test.ts", [/backup create/, /backup restore/, /devenv start/]],
  ] as const
) {
  Deno.test(`README: every command of the ${block} block parses with the CLI`, async () => {
    const steps = readmeSteps(block);
    assert.ok(steps.length >= 3, `only ${steps.length} steps`);
    for (const s of steps) {
      assert.equal(s.host, "control host", `README.md:${s.line}`);
      const argv = s.argv.slice(1);
      const r = resolve(await loadCommandPath(rootCommand, argv), argv);
      assert.ok(r.spec.run, `README.md:${s.line}: '${s.text}' is not a runnable command`);
      assert.equal(r.help, false);
    }
    const texts = steps.map((s) => s.text).join("\n");
    for (const w of wants) assert.match(texts, w);
    const test = await Deno.readTextFile(new URL(`./e2e/${e2e}`, import.meta.url));
    assert.match(test, new RegExp(`readmeSteps\\("${block}"\\)`));
    assert.match(test, /every README step ran/);
  });
}
