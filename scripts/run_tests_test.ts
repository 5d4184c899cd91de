import assert from "node:assert/strict";
import { discover, parseSummary } from "./run_tests.ts";

Deno.test("run_tests: deno test's summary line, with steps, colours and a FAILED line", () => {
  assert.deepEqual(parseSummary("x\nok | 12 passed (3 steps) | 0 failed (2s)\n"), {
    passed: 12,
    failed: 0,
  });
  assert.deepEqual(
    parseSummary("\x1b[0m\x1b[31mFAILED\x1b[0m | 3 passed | 2 failed | 1 filtered out (9s)\n"),
    { passed: 3, failed: 2 },
  );
  assert.equal(parseSummary("error: Module not found\n"), undefined);
});

Deno.test("run_tests: every suite is found, unit tests in one process, others one per file", () => {
  const jobs = discover();
  const unit = jobs.filter((j) => j.suite === "unit");
  assert.equal(unit.length, 1);
  assert.ok(unit[0].files.includes("src/fleet/topics_test.ts"));
  assert.ok(unit[0].files.includes("scripts/run_tests_test.ts"));
  const e2e = jobs.filter((j) => j.suite === "e2e").map((j) => j.name);
  assert.ok(e2e.includes("tests/e2e/faults_test.ts"), e2e.join(" "));
  const integration = jobs.filter((j) => j.suite === "integration");
  assert.ok(
    integration.every((j) => j.files.length === 1 && /^tests\/[^/]+_test\.ts$/.test(j.files[0])),
  );
});
