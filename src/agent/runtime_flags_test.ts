import assert from "node:assert/strict";
import { agentV8FlagsEnv } from "./runtime_flags.ts";

Deno.test("agentV8FlagsEnv: memory flags first, the user's DENO_V8_FLAGS after them", () => {
  assert.equal(agentV8FlagsEnv(undefined), "--max-semi-space-size=1,--lite-mode");
  assert.equal(agentV8FlagsEnv(""), "--max-semi-space-size=1,--lite-mode");
  assert.equal(
    agentV8FlagsEnv("--max-semi-space-size=8"),
    "--max-semi-space-size=1,--lite-mode,--max-semi-space-size=8",
  );
});
