/**
 * Fleet-server replicas, side by side in one run: N simulated robots (mTLS, each with its own
 * certificate, through the real ACL of a real Mosquitto) against
 *
 * - `sqlite x1`: one `k8s4r server` on SQLite (the embedded default);
 * - `postgres x1`: one server on a real PostgreSQL 15 (tests/helpers/postgres.ts);
 * - `postgres x3`: three replicas on that PostgreSQL, `--shared-subscription`;
 *
 * and, in every configuration, a bare `mosquitto_sub` on the same broker and topics (QoS 1).
 * Each configuration gets a fresh broker and database (a stopped server's persistent session
 * would keep queueing on the broker), then three phases:
 *
 * 1. burst: every robot publishes QoS 1 heartbeats back to back (window 1); ingest = messages /
 *    time until the servers (the sum of the replicas' counters) had them all, next to
 *    mosquitto_sub's rate in the same burst; CPU of each process meanwhile;
 * 2. steady: one heartbeat per robot every 10 s; CPU and RSS of mosquitto and of each replica;
 * 3. tasks: M tasks at a fixed rate through the servers' APIs in turn; the robots answer `done`
 *    at once; round trip = the server's createdAt -> finishedAt; a task delivered twice is
 *    counted.
 *
 * The servers are the real CLI (`deno run -A main.ts server`), each its own process. Their own
 * HTTPS certificate comes from the test Workload API (src/spiffe/testing/), the robots' from a
 * test CA the broker trusts: SPIRE is not what this measures (the `fleet` benchmark provisions
 * real SVIDs).
 */
import { join } from "node:path";
import { robotSpiffeId } from "../src/fleet/ids.ts";
import { type Daemon, realRunner, waitFor } from "../src/process/mod.ts";
import { TEST_TD, TestHttps } from "../src/server/testing.ts";
import { SimFleet } from "../src/sim/mod.ts";
import { X509Bundle, X509BundleSet } from "../src/spiffe/bundle.ts";
import { parseX509Svid } from "../src/spiffe/svid.ts";
import { startTestBroker, TEST_TRUST_DOMAIN, type TestBroker } from "../tests/helpers/broker.ts";
import { freePort } from "../tests/helpers/ports.ts";
import { fleetServerIdentity } from "../tests/helpers/server_identity.ts";
import { startTestPostgres, type TestPostgres } from "../tests/helpers/postgres.ts";
import { type BenchResult, figure } from "./report.ts";
import {
  type BenchOptions,
  Cleanup,
  cpuSeconds,
  MAIN_TS,
  ProcSampler,
  spawnSubscriberAt,
} from "./lib.ts";
import { percentile, round } from "./stats.ts";

interface Config {
  id: "sqlite1" | "pg1" | "pg3";
  label: string;
  replicas: number;
  postgres: boolean;
}

const CONFIGS: Config[] = [
  { id: "sqlite1", label: "sqlite x1", replicas: 1, postgres: false },
  { id: "pg1", label: "postgres x1", replicas: 1, postgres: true },
  { id: "pg3", label: "postgres x3", replicas: 3, postgres: true },
];

interface Server {
  n: number;
  api: string;
  daemon: Daemon;
  log: string;
}

/** The servers' HTTPS identity: a test Workload API and the roles file naming `web.admin`. */
async function serverIdentity(dir: string, cleanup: Cleanup) {
  const id = await fleetServerIdentity(dir, { ttlSeconds: 24 * 3600 });
  cleanup.add("workload api", id.close);
  return id;
}

async function startServers(
  c: Config,
  b: TestBroker,
  pg: { url: string; passwordFile: string } | undefined,
  id: Awaited<ReturnType<typeof serverIdentity>>,
  dir: string,
  cleanup: Cleanup,
): Promise<Server[]> {
  const creds = join(dir, `mqtt-${c.id}.json`);
  await Deno.writeTextFile(
    creds,
    JSON.stringify({ username: b.server.username, password: b.server.password }),
    { mode: 0o600 },
  );
  await Deno.chmod(creds, 0o600);
  const servers = await Promise.all(Array.from({ length: c.replicas }, async (_, i) => {
    const n = i + 1;
    const port = freePort();
    const log = join(dir, `server-${c.id}-${n}.log`);
    const storage = pg
      ? [
        "--database",
        pg.url,
        "--database-password-file",
        pg.passwordFile,
        ...(c.replicas > 1 ? ["--shared-subscription", "--client-id", `k8s4r-server-${n}`] : []),
      ]
      : ["--data-dir", join(dir, `data-${c.id}-${n}`)];
    const api = `https://localhost:${port}`;
    const daemon = await realRunner.spawn({
      name: `server ${c.label} #${n}`,
      cmd: Deno.execPath(),
      args: [
        "run",
        "-A",
        MAIN_TS,
        "server",
        "--broker-url",
        b.plainUrl,
        "--mqtt-credentials",
        creds,
        "--http-addr",
        `127.0.0.1:${port}`,
        ...id.args,
        ...storage,
      ],
      env: { NO_COLOR: "1" },
      logFile: log,
      ready: async () => {
        const r = await id.web.fetch(`${api}/healthz`).catch(() => undefined);
        await r?.body?.cancel();
        return r?.status === 200;
      },
      readyTimeoutMs: 60_000,
      readyIntervalMs: 200,
    });
    cleanup.add(`server ${c.id} #${n}`, () => daemon.stop(5000));
    return { n, api, daemon, log };
  }));
  return servers;
}

async function serverHeartbeats(web: TestHttps, servers: Server[]): Promise<number> {
  let sum = 0;
  for (const s of servers) {
    const r = await web.json(`${s.api}/api/stats`).catch(() => undefined);
    const h = r?.body?.messages?.received?.heartbeat;
    if (typeof h !== "number") return NaN;
    sum += h;
  }
  return sum;
}

/** CPU seconds of a process and its children (PostgreSQL: the postmaster and its backends). */
async function treeCpuSeconds(pid: number): Promise<number> {
  let sum = (await cpuSeconds(pid)) ?? 0;
  let kids: number[] = [];
  try {
    kids = (await Deno.readTextFile(`/proc/${pid}/task/${pid}/children`)).trim().split(/\s+/)
      .filter(Boolean).map(Number);
  } catch { /* gone */ }
  for (const k of kids) sum += (await cpuSeconds(k)) ?? 0;
  return sum;
}

/** File-size counter of a `mosquitto_sub -F x` output: one "x\n" per message. */
function subCounter(out: string) {
  return async () => {
    try {
      return Math.floor((await Deno.stat(out)).size / 2);
    } catch {
      return 0;
    }
  };
}

export async function benchReplicas(opts: BenchOptions, result: BenchResult): Promise<void> {
  const { log } = opts;
  const n = opts.robots;
  const quick = opts.quick;
  const burstMs = quick ? 4_000 : 6_000;
  const steadyMs = quick ? 20_000 : 40_000;
  const tasksN = quick ? 200 : 600;
  const taskRate = 50;
  const cleanup = new Cleanup();
  const details: Record<string, unknown> = {};
  result.details = details;
  let pgs: TestPostgres | undefined;
  try {
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-brep-" });
    await Deno.chmod(dir, 0o700);
    cleanup.add("dir", () => Deno.remove(dir, { recursive: true }));
    const id = await serverIdentity(dir, cleanup);
    log(`replicas: PostgreSQL 15 in a temp dir`);
    pgs = await startTestPostgres();
    const pgRef = pgs;
    cleanup.add("postgres", () => pgRef.destroy());
    const runConfig = async (c: Config, phase: Cleanup) => {
      const b = await startTestBroker();
      phase.add("broker", () => b.stop());
      const pg = c.postgres
        ? {
          url: pgRef.url(await pgRef.createDatabase(c.id)),
          passwordFile: pgRef.passwordFile,
        }
        : undefined;
      const tS = performance.now();
      const servers = await startServers(c, b, pg, id, dir, phase);
      log(
        `replicas: ${c.label}: ${servers.length} server(s) up in ${
          Math.round(performance.now() - tS)
        } ms`,
      );
      const { daemon: sub, out: subOut } = await spawnSubscriberAt(
        b.plainPort,
        b.server,
        phase,
        "k8s4r/robots/+/up/#",
        "x",
      );
      const subCount = subCounter(subOut);
      // The robots: a certificate each from the broker's CA, CN = robot id.
      const ids = Array.from({ length: n }, (_, i) => `sim-${String(i + 1).padStart(5, "0")}`);
      const svids = ids.map((robotId) => {
        const cert = b.ca.ca.issue({
          spiffeId: robotSpiffeId(TEST_TRUST_DOMAIN, robotId),
          dnsNames: [robotId],
          ttlSeconds: 24 * 3600,
        });
        return {
          robotId,
          svid: parseX509Svid(cert.chainDer, cert.keyDer),
          bundleDer: cert.bundleDer,
        };
      });
      const taskSeen = new Map<string, number>();
      const tC = performance.now();
      const fleet = await SimFleet.connect({
        brokerUrl: `mqtts://localhost:${b.tlsPort}`,
        brokerSpiffeId: b.brokerSpiffeId,
        svids: svids.map(({ robotId, svid }) => ({ robotId, svid })),
        // The robots' bundle holds both test CAs of the trust domain: the broker's (its
        // certificate) and the one that issued the servers' SVID (which signs every task), as
        // SPIRE's bundle holds every authority of the trust domain.
        bundles: new X509BundleSet([
          new X509Bundle(TEST_TRUST_DOMAIN, [
            ...X509Bundle.fromDer(TEST_TRUST_DOMAIN, svids[0].bundleDer).authorities,
            ...X509Bundle.fromDer(TEST_TD, id.web.ca.rootDer).authorities,
          ]),
        ]),
        heartbeatIntervalSeconds: 10,
        onTask: (_r, tid) => void taskSeen.set(tid, (taskSeen.get(tid) ?? 0) + 1),
      });
      phase.add("robots", () => fleet.close());
      const connectMs = performance.now() - tC;
      log(
        `replicas: ${c.label}: ${fleet.stats.connected} robots connected in ${
          Math.round(connectMs)
        } ms (${fleet.stats.connectFailures} failed)`,
      );
      if (fleet.stats.connected === 0) {
        throw new Error(`no robot connected: ${fleet.stats.lastError}`);
      }
      // Every register written.
      await waitFor(async () => {
        const r = await id.web.json(`${servers[0].api}/api/stats`);
        return r.body.robots.total >= fleet.stats.connected;
      }, { timeoutMs: 60_000, intervalMs: 250, what: `${c.label}: every robot registered` });
      const brokerPid = b.pid();
      if (brokerPid === undefined) throw new Error("the broker is not running");
      const pids: Record<string, number> = {
        broker: brokerPid,
        sub: sub.pid,
        simulator: Deno.pid,
      };
      const pgPid = c.postgres ? pgRef.cluster.pid : undefined;
      for (const s of servers) pids[`server${s.n}`] = s.daemon.pid;

      // 1. Burst.
      const subBase = await subCount();
      const srvBase = await serverHeartbeats(id.web, servers);
      const sampler = new ProcSampler(pids);
      await sampler.start();
      const pgCpu0 = pgPid ? await treeCpuSeconds(pgPid) : 0;
      const t0 = performance.now();
      const burst = await fleet.burst(burstMs, 1);
      const brokerRate = burst.acked / (burst.ms / 1000);
      let subT: number | undefined;
      let srvT: number | undefined;
      await waitFor(async () => {
        const now = performance.now();
        if (subT === undefined && (await subCount()) - subBase >= burst.acked) subT = now;
        if (
          srvT === undefined && (await serverHeartbeats(id.web, servers)) - srvBase >= burst.acked
        ) {
          srvT = now;
        }
        return subT !== undefined && srvT !== undefined;
      }, { timeoutMs: 120_000, intervalMs: 100, what: `${c.label}: the burst written` })
        .catch(() => {});
      const proc = await sampler.stop();
      // Backends that ended meanwhile are not counted: a lower bound.
      const pgCpuPct = pgPid
        ? ((await treeCpuSeconds(pgPid)) - pgCpu0) / ((performance.now() - t0) / 1000) * 100
        : NaN;
      const subRate = subT ? burst.acked / ((subT - t0) / 1000) : NaN;
      const srvRate = srvT ? burst.acked / ((srvT - t0) / 1000) : NaN;
      const serverCpu = servers.map((s) => round(proc[`server${s.n}`].cpuPct));
      log(
        `replicas: ${c.label}: burst ${burst.acked} msgs, broker ${round(brokerRate)}/s, ` +
          `mosquitto_sub ${round(subRate)}/s, servers ${round(srvRate)}/s (CPU ${
            serverCpu.join(
              "+",
            )
          }%, mosquitto ${round(proc.broker.cpuPct)}%, simulator ${
            round(proc.simulator.cpuPct)
          }%, PostgreSQL ${round(pgCpuPct)}%)`,
      );
      result.figures.push(
        figure(
          `replicas.${c.id}.ingest`,
          `burst ingest, ${c.label} (${fleet.stats.connected} robots)`,
          "msg/s",
          Number.isFinite(srvRate) ? [srvRate] : [],
          { runs: 1 },
        ),
        figure(
          `replicas.${c.id}.sub`,
          `burst, bare mosquitto_sub (same burst as ${c.label})`,
          "msg/s",
          Number.isFinite(subRate) ? [subRate] : [],
          { runs: 1 },
        ),
        figure(
          `replicas.${c.id}.burst_server_cpu`,
          `burst: CPU of the server(s), ${c.label} (sum)`,
          "%",
          [serverCpu.reduce((a, x) => a + x, 0)],
          { runs: 1 },
        ),
      );

      // 2. Steady: one heartbeat per robot every 10 s.
      fleet.startHeartbeats(10_000);
      await new Promise((r) => setTimeout(r, 10_000)); // every robot on its cycle
      const steady = new ProcSampler(pids, 1000);
      await steady.start();
      await new Promise((r) => setTimeout(r, steadyMs));
      const sp = await steady.stop();
      const steadyCpu = servers.map((s) => round(sp[`server${s.n}`].cpuPct));
      const steadyRss = servers.map((s) => round(percentile(sp[`server${s.n}`].rssMb, 50)));
      log(`replicas: ${c.label}: steady (1 hb / 10 s / robot): server CPU ${
        steadyCpu.join(
          "+",
        )
      }%, RSS ${steadyRss.join("+")} MB; mosquitto ${round(sp.broker.cpuPct)}%, ${
        round(percentile(sp.broker.rssMb, 50))
      } MB`);
      result.figures.push(
        figure(
          `replicas.${c.id}.steady_server_cpu`,
          `steady 1 hb/10 s: CPU per server, ${c.label}`,
          "%",
          servers.map((s) => sp[`server${s.n}`].cpuPct),
          { runs: 1 },
        ),
        figure(
          `replicas.${c.id}.steady_server_rss`,
          `steady: RSS per server, ${c.label}`,
          "MB",
          servers.map((s) => percentile(sp[`server${s.n}`].rssMb, 50)),
          { runs: 1 },
        ),
        figure(`replicas.${c.id}.steady_broker_cpu`, `steady: mosquitto CPU, ${c.label}`, "%", [
          sp.broker.cpuPct,
        ], { runs: 1 }),
        figure(
          `replicas.${c.id}.steady_broker_rss`,
          `steady: mosquitto RSS, ${c.label}`,
          "MB",
          sp.broker.rssMb,
          { runs: 1 },
        ),
      );

      // 3. Tasks through the servers' APIs in turn, heartbeats going on.
      const robotsUp = fleet.robots.map((r) => r.id);
      const posted: { id: string; api: string }[] = [];
      const postErrors: string[] = [];
      const inflight = new Set<Promise<void>>();
      const tT = performance.now();
      for (let i = 0; i < tasksN; i++) {
        const wait = tT + (i * 1000) / taskRate - performance.now();
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
        const api = servers[i % servers.length].api;
        const p = id.web.json(`${api}/api/robots/${robotsUp[i % robotsUp.length]}/tasks`, {
          method: "POST",
          body: JSON.stringify({ command: ["true"], timeoutSeconds: 30 }),
        }).then((r) => {
          if (r.status === 201) posted.push({ id: r.body.id, api });
          else postErrors.push(`${r.status} ${JSON.stringify(r.body)}`);
        }).catch((err) => void postErrors.push((err as Error).message));
        inflight.add(p);
        p.finally(() => inflight.delete(p));
      }
      await Promise.all([...inflight]);
      await waitFor(() => posted.every((p) => taskSeen.has(p.id)), {
        timeoutMs: 60_000,
        intervalMs: 200,
        what: "every task at its robot",
      }).catch(() => {});
      await waitFor(async () => {
        const r = await id.web.json(`${servers[0].api}/api/stats`);
        return (r.body.tasks.done ?? 0) >= posted.length;
      }, { timeoutMs: 60_000, intervalMs: 200, what: "every task done" }).catch(() => {});
      fleet.stopHeartbeats();
      const rtt: number[] = [];
      const notDone: string[] = [];
      const states: Record<string, number> = {}; // of the tasks not done
      const q = [...posted];
      await Promise.all(Array.from({ length: 8 }, async () => {
        while (q.length) {
          const p = q.shift()!;
          const t = (await id.web.json(`${servers[0].api}/api/tasks/${p.id}`)).body;
          if (t.state === "done" && t.finishedAt) {
            rtt.push(Date.parse(t.finishedAt) - Date.parse(t.createdAt));
          } else {
            notDone.push(`${p.id}: ${t.state}`);
            states[t.state] = (states[t.state] ?? 0) + 1;
          }
        }
      }));
      const twice = [...taskSeen.values()].filter((k) => k > 1).length;
      const fs = fleet.stats;
      log(
        `replicas: ${c.label}: ${posted.length} tasks posted (${postErrors.length} POST errors${
          postErrors[0] ? `, e.g. ${postErrors[0]}` : ""
        }), round trip p50 ${rtt.length ? round(percentile(rtt, 50)) : "-"} ms p99 ${
          rtt.length ? round(percentile(rtt, 99)) : "-"
        } ms; ${notDone.length} not done ${JSON.stringify(states)}, ${twice} delivered twice; ` +
          `robots: ${fs.tasksReceived} received, ${fs.tasksAnswered} answered, ${fs.refused} refused${
            fs.lastRefusal ? ` (${fs.lastRefusal})` : ""
          }, ${fs.malformed} malformed, ${fs.disconnects} disconnects`,
      );
      if (rtt.length === 0) {
        throw new Error(
          `${c.label}: no task round trip (${posted.length} posted, ${fs.refused} refused by the robots${
            fs.lastRefusal ? `: ${fs.lastRefusal}` : ""
          })`,
        );
      }
      {
        result.figures.push(
          figure(
            `replicas.${c.id}.task_rtt`,
            `task round trip, ${c.label}, ${taskRate}/s through ${servers.length} API(s)`,
            "ms",
            rtt,
            { runs: 1 },
          ),
        );
      }
      result.notes.push(
        `${c.label}: ${fleet.stats.connected} robots connected in ${
          (connectMs / 1000).toFixed(1)
        } s; ` +
          `burst of ${burst.acked} heartbeats: broker ${round(brokerRate)}/s, mosquitto_sub ${
            round(subRate)
          }/s, ` +
          `server(s) ${round(srvRate)}/s (${round(srvRate / subRate)}× mosquitto_sub), server CPU ${
            serverCpu.join(" + ")
          }%, ` +
          `mosquitto ${round(proc.broker.cpuPct)}%, the simulated robots ${
            round(proc.simulator.cpuPct)
          }%${
            c.postgres ? `, PostgreSQL ≥ ${round(pgCpuPct)}%` : ""
          } (100% = one core); tasks: ${posted.length} posted (${postErrors.length} POST errors${
            postErrors[0] ? `, e.g. ${postErrors[0]}` : ""
          }), ${rtt.length} done, ${notDone.length} not done, ${twice} delivered twice.`,
      );
      details[c.id] = {
        connected: fleet.stats.connected,
        connectMs,
        burst: { ...burst, brokerRate, subRate, srvRate, proc, pgCpuPct },
        steady: sp,
        tasks: { posted: posted.length, postErrors, notDone, twice },
      };
    };
    for (const c of CONFIGS) {
      const phase = new Cleanup();
      try {
        await runConfig(c, phase);
      } finally {
        await phase.run(log);
      }
    }
  } finally {
    await cleanup.run(log);
  }
}
