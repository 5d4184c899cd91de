import assert from "node:assert/strict";
import { FleetService, type Publisher } from "./fleet.ts";
import { HealthView } from "./health.ts";
import { openSqliteFile } from "./registry_sqlite.ts";
import { heartbeatMessage, UNSIGNED } from "./testing.ts";
import type { Registry } from "./registry.ts";

const pub: Publisher = { publish: () => Promise.resolve(), connected: () => true };

const heartbeat = (robotId: string, seq: number) =>
  heartbeatMessage(robotId, seq, {
    ts: "2025-01-01T00:00:00.000Z",
    svidExpiresAt: "2025-01-01T01:00:00.000Z",
  });

function setup() {
  const registry = openSqliteFile(":memory:");
  const fleet = new FleetService(registry, pub, { signer: UNSIGNED });
  const clock = { t: 1_000_000 };
  const reads = { n: 0 };
  registry.setTimer((op) => {
    if (op === "read") reads.n++;
  });
  const health = new HealthView({ fleet, mqttConnected: () => true, now: () => clock.t });
  return { registry, fleet, clock, reads, health };
}

Deno.test("/healthz: concurrent calls share one registry read, at most one per second", async () => {
  const { registry, fleet, clock, reads, health } = setup();
  try {
    for (let i = 0; i < 30; i++) await fleet.handleBatch([heartbeat(`robot-${i}`, 1)]);
    await fleet.settled(); // the dispatches the heartbeats triggered read the registry too
    reads.n = 0;
    const answers = await Promise.all(Array.from({ length: 600 }, () => health.answer(false)));
    assert.ok(answers.every(([status]) => status === 200));
    assert.equal((answers[0][1].robots as { total: number }).total, 30);
    assert.equal(reads.n, 2, "one refresh (robots, tasks) for 600 concurrent calls");
    // Within the second: no read, the counters as they were.
    await fleet.handleBatch([heartbeat("robot-new", 1)]);
    await fleet.settled();
    reads.n = 2;
    clock.t += 999;
    assert.equal(((await health.answer(false))[1].robots as { total: number }).total, 30);
    assert.equal(reads.n, 2);
    // Control: a second later the counters are read again and show the new robot.
    clock.t += 1;
    assert.equal(((await health.answer(false))[1].robots as { total: number }).total, 31);
    assert.equal(reads.n, 4);
  } finally {
    await registry.close();
  }
});

Deno.test("/healthz: a registry that fails every write is a 503 naming it; details only for operators", async () => {
  const { registry, fleet, clock, health } = setup();
  try {
    // Control: writes succeed, 200.
    assert.equal((await fleet.handleBatch([heartbeat("robot-1", 1)])).acked, 1);
    const [okStatus, okBody] = await health.answer(false);
    assert.equal(okStatus, 200, JSON.stringify(okBody));
    assert.equal(okBody.problems, undefined);
    // Every write fails from now on (as on a full disk or a read-only standby).
    registry.setStatementHook(() => {
      throw Object.assign(new Error("/var/lib/k8s4r/registry.sqlite: database or disk is full"), {
        code: "ERR_SQLITE_ERROR",
        errcode: 13,
      });
    });
    assert.equal((await fleet.handleBatch([heartbeat("robot-1", 2)])).acked, 0);
    clock.t += 5000;
    const [status, body] = await health.answer(true);
    assert.equal(status, 503);
    const problems = body.problems as string[];
    assert.equal(problems.length, 1, problems.join("; "));
    assert.match(
      problems[0],
      /^registry: writes failing since \d{4}-.*Z: \/var\/lib\/k8s4r\/registry\.sqlite: database or disk is full$/,
    );
    // Anyone else: the same problem, in general words (no path, no address), and its code.
    const [anonStatus, anon] = await health.answer(false);
    assert.equal(anonStatus, 503);
    assert.match(
      (anon.problems as string[])[0],
      /^registry: writes failing since \S+ \(SQLite 13\); see the server's log$/,
    );
    assert.ok(!JSON.stringify(anon).includes("/var/lib"), JSON.stringify(anon));
    // It recovers with the next batch that commits.
    registry.setStatementHook(undefined);
    assert.equal((await fleet.handleBatch([heartbeat("robot-1", 2)])).acked, 1);
    assert.equal((await health.answer(false))[0], 200);
  } finally {
    await registry.close();
  }
});

Deno.test("/healthz: a registry that does not answer is a 503 within the deadline, its address for operators only", async () => {
  const { registry, fleet } = setup();
  try {
    let hang = true;
    const answer = () =>
      hang
        ? new Promise<never>(() => {})
        : Promise.reject(new Error("postgres://k8s4r@db.internal:5432/k8s4r: cannot connect"));
    const stuck = { listRobots: answer, countTasksByState: answer } as unknown as Registry;
    // The fleet as HealthView sees it, on a registry that never answers (then fails).
    const on = (registry: Registry) =>
      ({
        registry,
        linkState: () => fleet.linkState(),
        fleetDelivering: () => fleet.fleetDelivering(),
        stats: fleet.stats,
        writes: fleet.writes,
      }) as unknown as FleetService;
    const view = new HealthView({
      fleet: on(stuck),
      mqttConnected: () => true,
      readTimeoutMs: 200,
    });
    const [status, body] = await view.answer(true);
    assert.equal(status, 503);
    assert.deepEqual(body.problems, ["registry: reads fail: no answer within 0.2 s"]);
    // The database's own error: its address for an operator, not for anyone.
    hang = false;
    const later = new HealthView({ fleet: on(stuck), mqttConnected: () => true });
    const detailed = (await later.answer(true))[1].problems as string[];
    assert.match(detailed[0], /^registry: reads fail: postgres:\/\/k8s4r@db\.internal:5432/);
    const anon = (await new HealthView({ fleet: on(stuck), mqttConnected: () => true })
      .answer(false))[1];
    assert.deepEqual(anon.problems, ["registry: reads fail; see the server's log"]);
    assert.ok(!JSON.stringify(anon).includes("db.internal"));
  } finally {
    await registry.close();
  }
});
