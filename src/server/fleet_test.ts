/**
 * FleetService without a network: status ordering (bootId/connection, the last will), the
 * broker link (unknown state, no offline during an outage), batches whose registry write fails
 * (nothing acknowledged past the failure), and operators' cancels (withdrawn, cancelling, settled
 * by the sweeper; every task and cancel signed). The cases are in testing/registry_contract.ts
 * (run here on SQLite, on PostgreSQL by tests/registry_postgres_test.ts).
 */
import assert from "node:assert/strict";
import { bufferIo } from "../cli/io.ts";
import { renderRobotsTable, robotStateText } from "./command.ts";
import { fleetCases } from "./testing/registry_contract.ts";
import { sqliteFixture } from "./testing/sqlite_fixture.ts";

for (const c of fleetCases) {
  Deno.test(`fleet [sqlite]: ${c.name}`, () => c.fn(sqliteFixture));
}

Deno.test("robots table: offline reason and state of servers that predate `state`", () => {
  const T0 = Date.parse("2025-01-01T00:00:00Z");
  const base = {
    id: "r",
    lastSeen: new Date(T0).toISOString(),
    svidExpiresAt: null,
    agentVersion: null,
  };
  assert.equal(
    robotStateText({ ...base, state: "offline", online: false, offlineReason: "connection lost" }),
    "offline (connection lost)",
  );
  assert.equal(robotStateText({ ...base, online: true, offlineReason: null }), "online");
  const io = bufferIo();
  io.stdout.write(renderRobotsTable([{ ...base, online: false, offlineReason: null }], T0));
  assert.match(io.out(), /^r\s+offline\s+/m);
});
