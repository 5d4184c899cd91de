/**
 * The PostgreSQL registry under load and faults, on a REAL PostgreSQL 15 of its own
 * (tests/helpers/postgres.ts):
 *
 * - reads can never starve the ingest writer: with every read connection blocked, a batch of
 *   messages still commits (the writer has a connection of its own);
 * - a flood of unauthenticated /healthz over 3000 robots costs the database one read per
 *   second, and a concurrent ingest write commits;
 * - a frozen PostgreSQL (SIGSTOP of the server and its backends): reads and writes fail
 *   (query_timeout) instead of hanging, /healthz says so within its own deadline, and the
 *   registry works again after SIGCONT.
 */
import assert from "node:assert/strict";
import { FleetService, type Publisher } from "../src/server/fleet.ts";
import { createHandler } from "../src/server/http_api.ts";
import { HealthView } from "../src/server/health.ts";
import { openPostgresRegistry } from "../src/server/registry_postgres.ts";
import { staticRoles } from "../src/server/roles.ts";
import { heartbeatMessage, TestHttps, UNSIGNED } from "../src/server/testing.ts";
import { waitFor } from "../src/process/mod.ts";
import { startTestPostgres } from "./helpers/postgres.ts";

const pub: Publisher = { publish: () => Promise.resolve(), connected: () => true };

Deno.test({
  name:
    "registry on PostgreSQL: reads never starve the writer, /healthz never floods it, a frozen server is not waited for",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    const pgs = await startTestPostgres();
    try {
      await t.step("every read connection blocked: a batch of messages still commits", async () => {
        const db = await pgs.createDatabase("starve");
        const reg = await openPostgresRegistry(pgs.config(db));
        const lock = await pgs.adminSession(db);
        try {
          const fleet = new FleetService(reg, pub, { signer: UNSIGNED });
          // Reads of the tasks table wait behind this lock; the ingest writes robots only.
          await lock.query("BEGIN");
          await lock.query("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE");
          let readsDone = 0;
          const readErrors: string[] = [];
          const reads = Array.from(
            { length: 8 },
            () =>
              reg.countTasksByState().then(
                () => readsDone++,
                (err) => readErrors.push((err as Error).message),
              ),
          );
          const waiting = async () =>
            Number(
              (await pgs.admin(
                `SELECT count(*) AS n FROM pg_stat_activity
                 WHERE datname = $1 AND wait_event_type = 'Lock'`,
                [db],
              ))[0].n,
            );
          // The pool's read connections are all taken, each waiting on the lock.
          await waitFor(async () => (await waiting()) >= 3, {
            timeoutMs: 20_000,
            intervalMs: 50,
            what: "the reads to wait on the lock",
          });
          const r = await fleet.handleBatch([heartbeatMessage("robot-001", 1)]);
          assert.equal(r.error, undefined, String(r.error));
          assert.equal(r.acked, 1);
          // Control: the flood was real: no read got through while the write committed.
          assert.equal(readsDone, 0, "a read finished: the read connections were not all taken");
          await lock.query("ROLLBACK");
          await Promise.all(reads);
          assert.deepEqual(readErrors, []);
          assert.equal(readsDone, 8);
          assert.equal((await reg.getRobot("robot-001"))?.heartbeatsReceived, 1);
        } finally {
          await lock.end().catch(() => {});
          await reg.close();
          await pgs.dropDatabase(db);
        }
      });

      await t.step(
        "600 concurrent /healthz over 3000 robots: one registry refresh a second, the ingest write commits",
        async () => {
          const db = await pgs.createDatabase("healthz");
          const reg = await openPostgresRegistry(pgs.config(db));
          try {
            const at = new Date().toISOString();
            await reg.transaction(async (tx) => {
              for (let i = 0; i < 3000; i++) await tx.touchRobot(`robot-${i}`, at);
            });
            const fleet = new FleetService(reg, pub, { signer: UNSIGNED });
            const web = new TestHttps();
            const handler = createHandler({
              fleet,
              mqttConnected: () => true,
              auth: { trustDomain: web.trustDomain, bundles: web.source, roles: staticRoles({}) },
              hosts: { port: 443, names: () => new Set(["localhost"]) },
            });
            let reads = 0;
            reg.setTimer((op) => {
              if (op === "read") reads++;
            });
            const t0 = Date.now();
            const flood = Array.from({ length: 600 }, async () => {
              const res = await handler(
                new Request("https://localhost/healthz", { headers: { host: "localhost" } }),
              );
              return { status: res.status, body: await res.json() };
            });
            const write = fleet.handleBatch([heartbeatMessage("robot-7", 1)]);
            const answers = await Promise.all(flood);
            const r = await write;
            assert.equal(r.error, undefined, String(r.error));
            assert.equal(r.acked, 1);
            for (const a of answers) assert.equal(a.status, 200, JSON.stringify(a.body));
            assert.equal(answers[0].body.robots.total, 3000);
            // At most one refresh (2 reads: robots, tasks) per second the flood lasted, and
            // one to start; not one per call.
            const seconds = Math.ceil((Date.now() - t0) / 1000);
            assert.ok(
              reads <= 2 * (seconds + 1),
              `${reads} registry reads for 600 calls of /healthz in ${seconds} s`,
            );
          } finally {
            await reg.close();
            await pgs.dropDatabase(db);
          }
        },
      );

      await t.step(
        "a frozen PostgreSQL (SIGSTOP): a read and a write fail instead of hanging, /healthz says so at once",
        async () => {
          const db = await pgs.createDatabase("frozen");
          const reg = await openPostgresRegistry(pgs.config(db));
          try {
            const fleet = new FleetService(reg, pub, { signer: UNSIGNED });
            // Control: before the stop, a read answers and a write commits (each pool now holds
            // an idle connection to the server that is about to freeze).
            assert.equal((await fleet.handleBatch([heartbeatMessage("robot-001", 1)])).acked, 1);
            assert.equal((await reg.listRobots()).length, 1);
            const health = new HealthView({ fleet, mqttConnected: () => true, refreshMs: 0 });
            assert.equal((await health.answer())[0], 200);
            const frozen = pgs.freeze();
            assert.ok(frozen.length >= 3, `froze ${frozen.join(", ")}`);
            let timer: ReturnType<typeof setTimeout> | undefined;
            // A bound on the wait (not a measure of speed): a hang is told from a failure.
            const bound = new Promise<"still waiting after 60 s">((resolve) => {
              timer = setTimeout(() => resolve("still waiting after 60 s"), 60_000);
            });
            try {
              const read = reg.listRobots().then(() => "answered", (e) => e as Error);
              const write = fleet.handleBatch([heartbeatMessage("robot-001", 2)]);
              // /healthz does not wait for the registry (its own deadline).
              const [status, body] = await Promise.race([
                health.answer(true),
                bound.then(() => [0, {}] as [number, Record<string, unknown>]),
              ]);
              assert.equal(status, 503);
              assert.deepEqual(body.problems, ["registry: reads fail: no answer within 1.5 s"]);
              const r = await Promise.race([read, bound]);
              assert.ok(r instanceof Error, `the read: ${r}`);
              assert.match(r.message, /timeout/i);
              const w = await Promise.race([write, bound]);
              assert.ok(typeof w === "object", `the write: ${w}`);
              assert.equal(w.acked, 0);
              assert.match(w.error ?? "", /timeout/i);
            } finally {
              clearTimeout(timer);
              pgs.thaw();
            }
            // Thawed: the registry works again (the timed-out connections were not reused).
            await waitFor(() => reg.listRobots().then(() => true, () => false), {
              timeoutMs: 30_000,
              what: "a read after SIGCONT",
            });
            const again = await fleet.handleBatch([heartbeatMessage("robot-001", 2)]);
            assert.equal(again.acked, 1, String(again.error));
            assert.equal((await reg.getRobot("robot-001"))?.heartbeatsReceived, 2);
          } finally {
            pgs.thaw();
            await reg.close();
            await pgs.dropDatabase(db);
          }
        },
      );
    } finally {
      await pgs.destroy();
    }
  },
});
