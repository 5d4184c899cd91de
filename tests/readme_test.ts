import assert from "node:assert/strict";
import { README, readmeCommands } from "./helpers/readme.ts";

Deno.test("readmeCommands: the marked block's k8s4r commands; anything else is an error", () => {
  const text = [
    "intro",
    "<!-- e2e: demo -->",
    "```sh",
    "# a comment",
    "deno task k8s4r ca init",
    "deno task k8s4r devenv start --ha --robots 2   # trailing comment",
    "```",
  ].join("\n");
  assert.deepEqual(readmeCommands(text, "demo"), [
    ["ca", "init"],
    ["devenv", "start", "--ha", "--robots", "2"],
  ]);
  assert.throws(() => readmeCommands(text, "other"), /no '<!-- e2e: other -->' block/);
  assert.throws(
    () => readmeCommands(text.replace("deno task k8s4r ca init", "rm -rf /"), "demo"),
    /not a k8s4r command: rm -rf/,
  );
});

Deno.test("README: the blocks the e2e suite runs exist and parse", async () => {
  const text = await Deno.readTextFile(README);
  for (const name of ["scale-out"]) {
    assert.ok(readmeCommands(text, name).length >= 3, `block ${name} is too short`);
  }
});
