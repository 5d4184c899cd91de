import assert from "node:assert/strict";
import { agentRunArgs, agentV8FlagsEnv } from "./runtime_flags.ts";

Deno.test("agentV8FlagsEnv: memory flags first, the user's DENO_V8_FLAGS after them", () => {
  assert.equal(agentV8FlagsEnv(undefined), "--max-semi-space-size=1,--lite-mode");
  assert.equal(agentV8FlagsEnv(""), "--max-semi-space-size=1,--lite-mode");
  assert.equal(
    agentV8FlagsEnv("--max-semi-space-size=8"),
    "--max-semi-space-size=1,--lite-mode,--max-semi-space-size=8",
  );
});

Deno.test("agentRunArgs: deno run gets the agent's flags right after run; a compiled k8s4r nothing", () => {
  assert.deepEqual(
    agentRunArgs(["run", "-A", "--quiet", "--config", "/p/deno.json", "/p/main.ts"]),
    [
      "run",
      "--no-code-cache",
      "--node-modules-dir=manual",
      "-A",
      "--quiet",
      "--config",
      "/p/deno.json",
      "/p/main.ts",
    ],
  );
  assert.deepEqual(agentRunArgs([]), []);
  // Not `deno run` (e.g. a compiled k8s4r given extra arguments): left alone.
  assert.deepEqual(agentRunArgs(["agent"]), ["agent"]);
});
