/**
 * The README's "Run a robot on another machine" block stays runnable: every line parses with the
 * real command tree (no unknown command or flag), names a host, and the e2e suite that runs them
 * (tests/e2e/remote_robots_test.ts) reads this very block.
 */
import assert from "node:assert/strict";
import { loadCommandPath, resolve } from "../src/cli/mod.ts";
import { rootCommand } from "../src/cli/commands.ts";
import { README, readmeSteps } from "./helpers/readme_commands.ts";

Deno.test("README: every command of the remote-robots block parses with the CLI", async () => {
  const steps = readmeSteps("remote-robots");
  assert.ok(steps.length >= 10, `only ${steps.length} steps`);
  for (const s of steps) {
    // Subcommands are lazy: load the path's specs first, as main.ts does.
    const tree = await loadCommandPath(rootCommand, s.argv.slice(1));
    const r = resolve(tree, s.argv.slice(1));
    assert.ok(r.spec.run, `README.md:${s.line}: '${s.text}' is not a runnable command`);
    assert.equal(r.help, false);
  }
  const hosts = new Set(steps.map((s) => s.host));
  assert.deepEqual([...hosts].sort(), ["control host", "robot-007", "robot-008"]);
  // What the block promises is there: both attestations, the round trip, list, remove, doctor.
  const texts = steps.map((s) => s.text).join("\n");
  for (
    const want of [
      /devenv start --advertise 10\.0\.0\.1 --attestation x509pop/,
      /robot add robot-007 --out/,
      /robot add robot-008 --attestation x509pop --csr robot-008\.csr/,
      /agent csr --robot-id robot-008/,
      /agent --enroll robot-007\.enroll\.json/,
      /task run robot-007 --/,
      /robot list/,
      /robot remove robot-007/,
      /doctor/,
    ]
  ) assert.match(texts, want);
});

Deno.test("README: every e2e block (remote robots, scale out, backup) parses with the one CLI", async () => {
  const readme = await Deno.readTextFile(README);
  const blocks = [...readme.matchAll(/^<!-- e2e:([a-z0-9-]+) -->$/gm)].map((m) => m[1]);
  for (const want of ["remote-robots", "scale-out", "backup"]) {
    assert.ok(blocks.includes(want), `no e2e:${want} block: ${blocks.join(", ")}`);
  }
  for (const name of blocks) {
    const steps = readmeSteps(name, readme);
    assert.ok(steps.length > 0, `e2e:${name} has no step`);
    for (const s of steps) {
      // Subcommands are lazy: load the path's specs first, as main.ts does.
      const tree = await loadCommandPath(rootCommand, s.argv.slice(1));
      const r = resolve(tree, s.argv.slice(1));
      assert.ok(r.spec.run, `README.md:${s.line}: '${s.text}' is not a runnable command`);
      assert.equal(r.help, false, `README.md:${s.line}`);
    }
  }
});

Deno.test("README: the e2e suite runs the block it documents", async () => {
  const e2e = await Deno.readTextFile(new URL("./e2e/remote_robots_test.ts", import.meta.url));
  assert.match(e2e, /readmeSteps\("remote-robots"\)/);
  assert.match(e2e, /every README step ran/);
});

Deno.test("README block parser: a command outside a host section is refused", () => {
  assert.throws(
    () => readmeSteps("x", "<!-- e2e:x -->\n```sh\nk8s4r robot list\n```\n"),
    /README\.md:3: a command before any '# HOST' line/,
  );
  assert.throws(
    () => readmeSteps("x", "<!-- e2e:x -->\n```sh\n# control host\nscp a b\n```\n"),
    /README\.md:4: expected a k8s4r command/,
  );
  const s = readmeSteps(
    "x",
    "<!-- e2e:x -->\n```sh\n# robot-1: copy a.json here, then\nk8s4r agent --enroll a.json\n```\n",
  );
  assert.deepEqual(s.map((x) => [x.host, x.copy, x.argv]), [[
    "robot-1",
    ["a.json"],
    ["k8s4r", "agent", "--enroll", "a.json"],
  ]]);
});
