/**
 * Registry ingest without MQTT: how many heartbeats per second `FleetService.handleBatch`
 * applies AND commits, on SQLite (WAL, synchronous=FULL) and on a real PostgreSQL 15 started
 * for the run (tests/helpers/postgres.ts, unix socket, SCRAM, default durability). This is the
 * ceiling the storage puts under the server's ingest (the `fleet` benchmark measures the whole
 * path through Mosquitto).
 *
 * Batches of 20 (a slow trickle: one batch per event-loop turn) and of 500 (a burst: what a
 * broker with max_inflight_messages 1000 hands over while the previous commit runs).
 */
import { join } from "node:path";
import { FleetService } from "../src/server/fleet.ts";
import { heartbeatMessage, UNSIGNED } from "../src/server/testing.ts";
import type { Registry } from "../src/server/registry.ts";
import { openSqliteRegistry } from "../src/server/registry_sqlite.ts";
import { openPostgresRegistry } from "../src/server/registry_postgres.ts";
import { startTestPostgres, type TestPostgres } from "../tests/helpers/postgres.ts";
import { type BenchResult, figure } from "./report.ts";
import { type BenchOptions, Cleanup } from "./lib.ts";
import { round } from "./stats.ts";

const ROBOTS = 200;
const enc = new TextEncoder();

const heartbeat = (robotId: string, seq: number) =>
  heartbeatMessage(robotId, seq, { bootId: `boot-${robotId}`, load: [0.1, 0.2, 0.3] });

function register(robotId: string) {
  return {
    topic: `k8s4r/robots/${robotId}/up/register`,
    payload: enc.encode(JSON.stringify({
      v: 1,
      type: "register",
      robotId,
      ts: new Date().toISOString(),
      spiffeId: `spiffe://bench/robot/${robotId}`,
      agentVersion: "bench",
      heartbeatIntervalSeconds: 10,
      svidExpiresAt: new Date(Date.now() + 3600_000).toISOString(),
      device: {
        hostname: robotId,
        os: "linux",
        arch: "x86_64",
        cpus: 1,
        memoryBytes: 1,
        load: [0, 0, 0],
        uptimeSeconds: 1,
      },
      bootId: `boot-${robotId}`,
      connection: 1,
    })),
  };
}

/** msg/s of `rounds` runs of `batches` batches of `size` heartbeats each. */
async function measure(reg: Registry, size: number, batches: number, rounds: number) {
  // Nothing is published here (no task): the signer is never called.
  const fleet = new FleetService(reg, { publish: () => Promise.resolve(), connected: () => true }, {
    signer: UNSIGNED,
  });
  const ids = Array.from({ length: ROBOTS }, (_, i) => `bench-${String(i).padStart(4, "0")}`);
  const r = await fleet.handleBatch(ids.map(register));
  if (r.error) throw new Error(`register: ${r.error}`);
  let seq = 0;
  const rates: number[] = [];
  for (let k = 0; k < rounds; k++) {
    const t0 = performance.now();
    for (let b = 0; b < batches; b++) {
      seq++;
      const items = Array.from({ length: size }, (_, i) => heartbeat(ids[i % ROBOTS], seq + i));
      seq += size;
      const out = await fleet.handleBatch(items);
      if (out.error || out.acked !== size) throw new Error(`batch: ${out.error}`);
    }
    rates.push((size * batches) / ((performance.now() - t0) / 1000));
  }
  await fleet.settled();
  return rates;
}

export async function benchStorage(opts: BenchOptions, result: BenchResult): Promise<void> {
  const cleanup = new Cleanup();
  const rounds = opts.quick ? 3 : 5;
  try {
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-bs-" });
    cleanup.add("temp dir", () => Deno.remove(dir, { recursive: true }));
    const pgs: TestPostgres = await startTestPostgres();
    cleanup.add("postgres", () => pgs.destroy());
    result.notes.push(
      `PostgreSQL ${pgs.version} on a unix socket, fsync and synchronous_commit on; ${ROBOTS} robots; heartbeats with load (4 statements each, plus the savepoint)`,
    );
    const backends: [string, () => Promise<Registry>][] = [
      ["sqlite", () => openSqliteRegistry(join(dir, `sqlite-${crypto.randomUUID()}`))],
      ["postgres", async () => openPostgresRegistry(pgs.config(await pgs.createDatabase("bench")))],
    ];
    for (const [name, open] of backends) {
      for (const [size, batches] of [[20, 25], [500, 2]]) {
        const reg = await open();
        try {
          const rates = await measure(reg, size, batches, rounds);
          opts.log(
            `storage: ${name}, batches of ${size}: ${rates.map((r) => round(r)).join(", ")} msg/s`,
          );
          result.figures.push(
            figure(
              `storage.${name}.batch${size}`,
              `registry ingest, ${name}, batches of ${size} (applied + committed)`,
              "msg/s",
              rates,
            ),
          );
        } finally {
          await reg.close();
        }
      }
    }
  } finally {
    await cleanup.run(opts.log);
  }
}
