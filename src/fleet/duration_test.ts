import assert from "node:assert/strict";
import { formatDuration, parseDuration } from "./duration.ts";

Deno.test("parseDuration: seconds, units and sums; anything else is refused", () => {
  assert.equal(parseDuration("600"), 600_000);
  assert.equal(parseDuration("90s"), 90_000);
  assert.equal(parseDuration("10m"), 600_000);
  assert.equal(parseDuration("1h30m"), 5_400_000);
  assert.equal(parseDuration("365d"), 365 * 86_400_000);
  for (const bad of ["", "10 m", "1y", "-5m", "m", "5m3"]) {
    assert.throws(() => parseDuration(bad), /expected a duration like 600, 10m, 24h or 365d/, bad);
  }
  assert.equal(formatDuration(parseDuration("3h4m")), "3h 4m");
});
