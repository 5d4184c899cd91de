/**
 * The scale-out stack, end to end (`devenv start --ha`: PostgreSQL 15, two SPIRE servers on
 * it behind haproxy, under the root CA; real Mosquitto, fleet server and two robots), started
 * by the README's "Scale out" commands, then three faults, each measured (recovery time, what
 * was lost: nothing):
 *
 * 1. `kill -9` of the SPIRE server most agents are on: every robot keeps renewing its X.509
 *    SVID (20 s, renewed every ~5 s) through several rotations, and its SPIRE agent renews its
 *    own SVID (agent_ttl 60 s) through the other server; no robot goes offline, no heartbeat
 *    is lost. Control: before the kill, that server served sessions (so the kill hit agents).
 * 2. PostgreSQL stopped for 30 s: the SPIRE servers turn unhealthy and say why (status, the
 *    doctor fails with a hint that names the fix), a write to SPIRE fails visibly, the robots
 *    stay online and keep sending heartbeats; after `devenv start` the servers serve again,
 *    nothing in the datastore is missing and a new entry is written and seen by both.
 *    Measured, not asserted: SPIRE renews no SVID while its datastore is down (an agent's sync
 *    starts with the bundle, which the server reads from the datastore), so the test's 20 s
 *    SVIDs expire during the outage; the robots' MQTT sessions, already established, stay up,
 *    and the SVIDs are renewed within seconds of the datastore's return. With production TTLs
 *    (1 h, renewed at half-life) an outage has to last about half an hour to matter.
 *
 * The stack runs three fleet servers on the shared PostgreSQL registry with a shared
 * subscription. During the outage they cannot write, so they acknowledge nothing and the
 * broker keeps the robots' messages; their `/healthz` is 503 and names the registry's error,
 * the doctor fails with a hint; afterwards every heartbeat is written (none missing).
 *
 * 3. `kill -9` of the fleet server that is the sweeper during a task stream (tasks through all
 *    three APIs, each appending its number to a file on its robot): a survivor takes the sweep
 *    and adopts the dead server's broker session; every task runs exactly once, no heartbeat
 *    is missing. Control: the same stream without the kill. `devenv start` brings it back.
 */
import assert from "node:assert/strict";
import type mqtt from "mqtt";
import { X509Certificate } from "node:crypto";
import { haproxyServers } from "../../src/devenv/haproxy.ts";
import { parsePemCerts } from "../../src/broker/identity.ts";
import { robotLayout } from "../../src/devenv/layout.ts";
import { isRecordAlive, processStartTime, realRunner, waitFor } from "../../src/process/mod.ts";
import { X509Source } from "../../src/spiffe/mod.ts";
import { readAgentData } from "../../src/spire/agent_state.ts";
import { SpireServerCli } from "../../src/spire/server.ts";
import { readmeSteps } from "../helpers/readme_commands.ts";
import { cmdlinesContaining, exposedIn } from "../helpers/secrets.ts";
import {
  E2eStack,
  metric,
  processTree,
  ROBOTS,
  type RobotView,
  SPIRE_SERVER,
  timeUntil,
  TRUST_DOMAIN,
} from "./stack.ts";

const SVID_TTL = 20;
const AGENT_TTL = 60;
/** What the test adds to the README's `devenv start`: short TTLs, the native broker. */
const START_EXTRA = [
  "--broker",
  "native",
  "--svid-ttl",
  String(SVID_TTL),
  "--agent-ttl",
  String(AGENT_TTL),
];
const OUTAGE_MS = 30_000;

const stack = await E2eStack.create({ heartbeatSeconds: 1, ha: true });
const test = stack.caseRegistrar("ha: ");

/** Every update of one robot's X.509 SVID, from its Workload API (in-process). */
class SvidWatch {
  readonly updates: { at: number; serial: string; notAfter: number }[] = [];
  private constructor(readonly robotId: string, readonly source: X509Source) {
    this.record();
    source.onUpdate(() => this.record());
  }

  static async open(robotId: string): Promise<SvidWatch> {
    const source = await X509Source.create({
      address: `unix://${stack.robotSocket(robotId)}`,
      spiffeId: `spiffe://${TRUST_DOMAIN}/robot/${robotId}`,
      timeoutMs: 30_000,
    });
    return new SvidWatch(robotId, source);
  }

  private record(): void {
    const leaf = this.source.getX509Svid().certificates[0] as X509Certificate;
    const last = this.updates[this.updates.length - 1];
    if (last?.serial === leaf.serialNumber) return;
    this.updates.push({
      at: Date.now(),
      serial: leaf.serialNumber,
      notAfter: Date.parse(leaf.validTo),
    });
  }

  /** Renewals after `t`. */
  since(t: number): number {
    return this.updates.filter((u) => u.at > t).length;
  }

  /** The current SVID is still valid (never expired while we watched). */
  valid(now = Date.now()): boolean {
    return this.updates[this.updates.length - 1].notAfter > now;
  }

  close(): void {
    this.source.close();
  }
}

const watches = new Map<string, SvidWatch>();
/** What the PostgreSQL outage did to the fleet servers' heartbeats (for the case after it). */
let fleetLost: number | undefined;
const fleetOutcome: string[] = [];

/**
 * The robots as the broker sees them: a client on the fleet servers' login subscribed to every
 * robot's heartbeats and statuses (not shared: it gets them all), with arrival times.
 */
class BrokerObserver {
  readonly beats = new Map<string, number[]>();
  readonly offlineAt: { id: string; at: number }[] = [];
  private constructor(private readonly client: mqtt.MqttClient) {
    client.on("message", (topic, payload) => {
      const m = /^k8s4r\/robots\/([^/]+)\/up\/(heartbeat|status)$/.exec(topic);
      if (!m) return;
      if (m[2] === "heartbeat") {
        if (!this.beats.has(m[1])) this.beats.set(m[1], []);
        this.beats.get(m[1])!.push(Date.now());
      } else {
        try {
          if (JSON.parse(payload.toString()).status === "offline") {
            this.offlineAt.push({ id: m[1], at: Date.now() });
          }
        } catch { /* not ours to judge */ }
      }
    });
  }

  static async open(): Promise<BrokerObserver> {
    const c = await stack.serverClient(`e2e-observer-${Date.now()}`);
    await c.subscribeAsync(["k8s4r/robots/+/up/heartbeat", "k8s4r/robots/+/up/status"], {
      qos: 0,
    });
    return new BrokerObserver(c);
  }

  heartbeats(id: string): number {
    return this.beats.get(id)?.length ?? 0;
  }

  /** The longest time without a heartbeat of `id` between `from` and `to`. */
  maxGap(id: string, from: number, to: number): number {
    const ts = [from, ...(this.beats.get(id) ?? []).filter((t) => t > from && t < to), to];
    return Math.max(...ts.slice(1).map((t, i) => t - ts[i]));
  }

  offlineBetween(from: number, to: number): string[] {
    return this.offlineAt.filter((o) => o.at >= from && o.at <= to).map((o) => o.id);
  }

  close(): void {
    this.client.end(true);
  }
}

async function agentSvidNotAfter(robotId: string): Promise<number> {
  const data = await readAgentData(robotLayout(stack.layout, robotId, stack.env).agentDataDir);
  return data?.svid?.notAfter.getTime() ?? 0;
}

function spireCli2(): SpireServerCli {
  return new SpireServerCli(realRunner, SPIRE_SERVER, stack.layout.ha.spireServer2Socket);
}

async function statusRows(): Promise<
  { name: string; running: boolean; healthy: boolean; detail: string }[]
> {
  const r = await stack.devenv("status", "--json");
  try {
    return JSON.parse(r.stdout).components;
  } catch {
    throw new Error(`status --json printed no JSON (exit ${r.code}): ${r.stdout}\n${r.stderr}`);
  }
}

test("the README's scale-out commands bring up PostgreSQL, two SPIRE servers, haproxy and the robots", async () => {
  const steps = readmeSteps("scale-out");
  assert.ok(steps.some((c) => c.text.startsWith("k8s4r devenv start --ha")));
  for (const step of steps) {
    assert.equal(step.host, "control host", `README.md:${step.line}`);
    const args = step.argv.slice(1);
    const full = args[0] === "devenv" && args[1] === "start" ? [...args, ...START_EXTRA] : args;
    const r = await stack.k8s4r(full, { timeoutMs: 300_000 });
    stack.remember();
    assert.equal(
      r.code,
      0,
      `README.md:${step.line}: k8s4r ${full.join(" ")} exited ${r.code}:\n${r.stdout}\n${r.stderr}`,
    );
    if (full[1] === "start") stack.started = true;
  }
  console.log("  every README step ran");
  const rows = await statusRows();
  for (const n of ["postgres", "root-ca", "spire-server", "spire-server-2", "haproxy"]) {
    const row = rows.find((x) => x.name === n);
    assert.ok(row?.running && row.healthy, `${n}: ${JSON.stringify(row)}`);
  }
  assert.ok(rows.every((x) => x.running && x.healthy), JSON.stringify(rows, null, 1));
  // One bundle, the root, on both servers; the exported file is that root.
  const root = new X509Certificate(await Deno.readTextFile(`${stack.layout.caDir}/root.crt`));
  for (const cli of [stack.spireCli(), spireCli2()]) {
    assert.deepEqual(
      parsePemCerts(await cli.bundlePem()).map((c) => c.fingerprint256),
      [root.fingerprint256],
    );
  }
  // Both servers run on PostgreSQL; the passwords are in no argv, no log, no open file.
  for (const d of [stack.layout.spireServerDataDir, stack.layout.ha.spireServer2DataDir]) {
    const conf = `${d}/server.generated.conf`;
    assert.match(await Deno.readTextFile(conf), /database_type = "postgres"/);
    assert.equal(Deno.statSync(conf).mode! & 0o777, 0o600, conf);
  }
  for (const f of [stack.layout.ha.spirePasswordFile, stack.layout.ha.postgresAdminPasswordFile]) {
    assert.equal(Deno.statSync(f).mode! & 0o777, 0o600, f);
    const pw = (await Deno.readTextFile(f)).trim();
    assert.ok(pw.length >= 32, `${f}: a short password`);
    assert.deepEqual(cmdlinesContaining(pw), [], `${f}'s password is on a command line`);
    assert.deepEqual(exposedIn([stack.layout.devEnvDir, stack.layout.spireDataDir], pw), []);
  }
  await stack.waitOnline(ROBOTS, 30_000);
  for (const id of ROBOTS) watches.set(id, await SvidWatch.open(id));
  // The README's backup of the HA stack: both databases by pg_dump, both servers' keys, the CA.
  const m = JSON.parse(await Deno.readTextFile(`${stack.dir}/k8s4r-ha-backup/manifest.json`));
  const kinds = Object.fromEntries(
    m.items.map((i: { name: string; kind: string }) => [i.name, i.kind]),
  );
  assert.equal(m.mode, "ha");
  assert.equal(kinds["spire-datastore"], "postgres");
  assert.equal(kinds["fleet-registry"], "postgres");
  for (const n of ["spire-keys", "spire-2-keys", "root-ca.crt", "upstream-ca.key"]) {
    assert.equal(kinds[n], "file", `${n}: ${JSON.stringify(kinds)}`);
  }
});

test("kill -9 of a SPIRE server: every robot keeps renewing through the other one", async () => {
  const servers = await haproxyServers(stack.files.haproxyStatsSocket);
  assert.ok(servers, "haproxy's stats socket does not answer");
  // The server with the most agent sessions: the kill must hit agents (the control).
  const [victim, info] = [...servers].sort((a, b) => b[1].sessions - a[1].sessions)[0];
  assert.ok(info.sessions >= 1, `no agent is on any SPIRE server: ${JSON.stringify([...servers])}`);
  const survivor = victim === "spire-server" ? "spire-server-2" : "spire-server";
  const pidFile = victim === "spire-server"
    ? stack.files.spireServerPid
    : stack.files.spireServer2Pid;
  const sup = stack.pid(pidFile);
  assert.ok(sup, `${victim} is not running`);
  const bin = [...processTree(sup.pid)].find(([pid]) => {
    try {
      return Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0")[0].endsWith("spire-server");
    } catch {
      return false;
    }
  });
  assert.ok(bin, `no spire-server process under ${victim}'s supervisor`);
  const agent0 = new Map<string, number>();
  for (const id of ROBOTS) agent0.set(id, await agentSvidNotAfter(id));
  const hb0 = new Map<string, number>();
  for (const id of ROBOTS) hb0.set(id, (await stack.robot(id)).heartbeats.received);
  console.log(`  killing ${victim} (spire-server pid ${bin[0]}, ${info.sessions} sessions)`);
  const t0 = Date.now();
  Deno.kill(bin[0], "SIGKILL");
  const downMs = await timeUntil(
    async () => {
      const s = await haproxyServers(stack.files.haproxyStatsSocket);
      return s?.get(victim)?.status.startsWith("DOWN") === true;
    },
    `haproxy to mark ${victim} down`,
    30_000,
    100,
  );
  const offline = new Set<string>();
  const expired = new Set<string>();
  const agentRenewed = new Map<string, number>();
  try {
    await waitFor(async () => {
      const now = Date.now();
      for (const id of ROBOTS) {
        if (!(await stack.robot(id)).online) offline.add(id);
        if (!watches.get(id)!.valid(now)) expired.add(id);
        if (!agentRenewed.has(id) && (await agentSvidNotAfter(id)) !== agent0.get(id)) {
          agentRenewed.set(id, now - t0);
        }
      }
      return ROBOTS.every((id) => watches.get(id)!.since(t0 + downMs) >= 4 && agentRenewed.has(id));
    }, {
      timeoutMs: 120_000,
      intervalMs: 500,
      what: "4 SVID renewals and an agent SVID renewal per robot",
    });
  } catch (err) {
    const counts = ROBOTS.map((id) =>
      `${id}: ${watches.get(id)!.since(t0)} renewals, agent SVID ${
        agentRenewed.has(id) ? "renewed" : "not renewed"
      }`
    );
    throw new Error(`${(err as Error).message}: ${counts.join("; ")}`);
  }
  const servedMs = Date.now() - t0;
  // Still down: everything above went through the survivor alone.
  assert.ok(!isRecordAlive(stack.pid(pidFile)) || processStartTime(bin[0]) !== bin[1]);
  const now = await haproxyServers(stack.files.haproxyStatsSocket);
  assert.ok(now?.get(victim)?.status.startsWith("DOWN"), `${victim}: ${now?.get(victim)?.status}`);
  assert.ok(now?.get(survivor)?.status.startsWith("UP"));
  let lost = 0;
  for (const id of ROBOTS) {
    const w = watches.get(id)!;
    const first = w.updates.find((u) => u.at > t0);
    metric(`ha.kill_spire.${id}.first_renewal_after_kill_ms`, first ? first.at - t0 : -1);
    metric(`ha.kill_spire.${id}.svid_renewals`, w.since(t0));
    metric(`ha.kill_spire.${id}.agent_svid_renewed_after_ms`, agentRenewed.get(id)!);
    const r = await stack.robot(id);
    lost += r.heartbeats.missing;
    assert.ok(r.heartbeats.received > hb0.get(id)!, `${id} sent no heartbeat`);
  }
  metric("ha.kill_spire.haproxy_marked_down_ms", downMs);
  metric("ha.kill_spire.observed_ms", servedMs);
  metric("ha.kill_spire.robots_offline", offline.size);
  metric("ha.kill_spire.svids_expired", expired.size);
  metric("ha.kill_spire.heartbeats_lost", lost);
  assert.deepEqual([...offline], [], "robots went offline");
  assert.deepEqual([...expired], [], "an SVID expired");
  assert.equal(lost, 0, "heartbeats were lost");
  // `devenv start` brings the killed server back; haproxy takes it in again.
  const t1 = Date.now();
  const r = await stack.devenv(...stack.startArgs(), ...START_EXTRA.slice(2));
  stack.remember();
  assert.equal(r.code, 0, `devenv start: ${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout, new RegExp(`${victim}: pid \\d+ was gone, restarted`));
  const backMs = await timeUntil(
    async () => {
      const s = await haproxyServers(stack.files.haproxyStatsSocket);
      return s?.get(victim)?.status.startsWith("UP") === true;
    },
    `haproxy to take ${victim} in again`,
    30_000,
    100,
  );
  metric("ha.kill_spire.restart_to_up_ms", Date.now() - t1);
  assert.ok(backMs >= 0);
});

test("PostgreSQL stopped for 30 s: SPIRE degrades visibly, robots stay connected, nothing is lost", async () => {
  const pg = stack.pid(stack.files.postgresPid);
  assert.ok(pg, "postgres is not running");
  const observer = await BrokerObserver.open();
  // Control: the observer does see the robots' heartbeats before the outage.
  await waitFor(() => ROBOTS.every((id) => observer.heartbeats(id) >= 2), {
    timeoutMs: 10_000,
    what: "the observer to see heartbeats",
  });
  const entriesBefore = (await stack.spireCli().listEntries()).map((e) => e.id).sort();
  assert.ok(entriesBefore.length >= 3, `only ${entriesBefore.length} entries`);
  const hb0 = new Map<string, number>();
  for (const id of ROBOTS) hb0.set(id, (await stack.robot(id)).heartbeats.received);
  const renewalsBefore = new Map(ROBOTS.map((id) => [id, watches.get(id)!.since(0)]));
  const t0 = Date.now();
  Deno.kill(pg.pid, "SIGINT"); // fast shutdown: the server goes away, connections are cut
  await waitFor(() => !isRecordAlive(pg), { timeoutMs: 20_000, what: "postgres to stop" });
  // Visible: both SPIRE servers unhealthy, saying why.
  let rows: Awaited<ReturnType<typeof statusRows>> = [];
  const visibleMs = await timeUntil(
    async () => {
      rows = await statusRows();
      return ["spire-server", "spire-server-2"].every((n) => {
        const row = rows.find((x) => x.name === n);
        return row !== undefined && !row.healthy && /connection refused|datastore/.test(row.detail);
      });
    },
    "both SPIRE servers to report the datastore",
    30_000,
    500,
  ).catch((err) => {
    throw new Error(`${(err as Error).message}: ${JSON.stringify(rows)}`);
  });
  assert.equal(rows.find((x) => x.name === "postgres")?.running, false);
  const d = await stack.doctor();
  assert.equal(d.code, 1, "the doctor passed with PostgreSQL down");
  const check = (id: string) => d.report.checks.find((c) => c.id === id);
  assert.equal(check("stack.postgres")?.status, "fail");
  assert.match(check("stack.postgres")?.hint ?? "", /PostgreSQL is down.*devenv start/);
  assert.equal(check("stack.spire-server")?.status, "fail");
  assert.match(check("stack.spire-server")?.hint ?? "", /PostgreSQL/);
  // The fleet servers degrade visibly too: /healthz fails and names the registry's error.
  for (const port of [stack.ports.http, stack.ports.http2!, stack.ports.http3!]) {
    const h = await fetch(`https://localhost:${port}/healthz`, {
      client: await stack.operatorClient(),
      signal: AbortSignal.timeout(5000),
    })
      .then(async (res) => ({ status: res.status, body: await res.text() }))
      .catch((e) => ({ status: 0, body: (e as Error).message }));
    console.log(`  during the outage, fleet server :${port} /healthz: ${h.status} ${h.body}`);
    assert.notEqual(h.status, 200, `fleet server :${port} says it is healthy`);
    assert.match(h.body, /ECONNREFUSED|postgres/, `fleet server :${port} does not say why`);
  }
  for (const n of ["server", "server-2", "server-3"]) {
    assert.equal(check(`stack.${n}`)?.status, "fail", n);
    assert.match(check(`stack.${n}`)?.hint ?? "", /PostgreSQL.*devenv start/, n);
  }
  // A write to SPIRE fails, and says so (nothing is silently dropped).
  const during = await spireCli2().createEntry({
    spiffeId: `spiffe://${TRUST_DOMAIN}/ha/during-outage`,
    parentId: `spiffe://${TRUST_DOMAIN}/k8s4r/node/robot-001`,
    selectors: ["unix:uid:65533"],
    dnsNames: [],
  }).then(() => "written", (e) => (e as Error).message);
  assert.notEqual(during, "written", "SPIRE accepted a write without its datastore");
  console.log(`  a SPIRE write during the outage: ${during}`);
  // 30 s of outage: the robots stay connected (seen at the broker: the fleet servers' API
  // cannot answer without their registry) and keep sending heartbeats.
  const outageEnd = t0 + OUTAGE_MS;
  await waitFor(() => Date.now() >= outageEnd, {
    timeoutMs: OUTAGE_MS + 5000,
    intervalMs: 250,
    what: "the outage to last 30 s",
  });
  const offline = new Set(observer.offlineBetween(t0, Date.now()));
  const gaps = ROBOTS.map((id) => observer.maxGap(id, t0, Date.now()));
  const renewedDuring = ROBOTS.map((id) => watches.get(id)!.since(0) - renewalsBefore.get(id)!);
  const expiredDuring = ROBOTS.filter((id) => !watches.get(id)!.valid());
  // Back: `devenv start` starts PostgreSQL again; the servers serve again by themselves.
  const t1 = Date.now();
  const r = await stack.devenv(...stack.startArgs(), ...START_EXTRA.slice(2));
  stack.remember();
  assert.equal(r.code, 0, `devenv start: ${r.stdout}\n${r.stderr}`);
  const restartedServers = ["server", "server-2", "server-3"].filter((n) =>
    new RegExp(`✓ ${n}: (pid \\d+ was gone|unhealthy)`).test(r.stdout)
  );
  const recoveredMs = await timeUntil(
    async () => {
      const rs = await statusRows();
      return ["postgres", "spire-server", "spire-server-2", "server", "server-2", "server-3"]
        .every((n) => rs.find((x) => x.name === n)?.healthy === true);
    },
    "postgres and both SPIRE servers healthy",
    60_000,
    250,
  );
  const recoveryMs = Date.now() - t1;
  // Nothing lost: every entry is there; a new write lands and both servers see it.
  const entriesAfter = (await stack.spireCli().listEntries()).map((e) => e.id).sort();
  const missingEntries = entriesBefore.filter((id) => !entriesAfter.includes(id));
  const extra = (await stack.spireCli().listEntries()).filter((e) => !entriesBefore.includes(e.id));
  console.log(
    `  entries added across the outage: ${extra.map((e) => e.spiffeId).join(", ") || "none"}`,
  );
  assert.deepEqual(missingEntries, [], `entries lost across the outage (after: ${entriesAfter})`);
  const created = await spireCli2().createEntry({
    spiffeId: `spiffe://${TRUST_DOMAIN}/ha/after-outage`,
    parentId: `spiffe://${TRUST_DOMAIN}/k8s4r/node/robot-001`,
    selectors: ["unix:uid:65533"],
    dnsNames: [],
  });
  assert.equal(
    (await stack.spireCli().listEntries({ spiffeId: created.spiffeId })).length,
    1,
    "an entry written through spire-server-2 is not seen through spire-server",
  );
  await stack.spireCli().deleteEntry(created.id);
  // The robots renew again and are online; no heartbeat lost.
  const t2 = Date.now();
  await waitFor(() => ROBOTS.every((id) => watches.get(id)!.since(t2) >= 2), {
    timeoutMs: 60_000,
    intervalMs: 500,
    what: "2 SVID renewals per robot after the outage",
  });
  const renewedAfterMs = Date.now() - t2;
  await stack.waitOnline(ROBOTS, 30_000);
  let lost = 0;
  const tEnd = Date.now();
  for (const id of ROBOTS) {
    const v = await stack.robot(id);
    lost += v.heartbeats.missing;
    const written = v.heartbeats.received - hb0.get(id)!;
    const sent = observer.beats.get(id)!.filter((t) => t > t0 && t <= tEnd).length;
    metric(`ha.pg_outage.${id}.heartbeats_sent_at_broker`, sent);
    metric(`ha.pg_outage.${id}.heartbeats_written`, written);
    fleetOutcome.push(
      `${id}: ${sent} sent (seen at the broker), ${written} written, ` +
        `${v.heartbeats.missing} counted missing`,
    );
  }
  fleetLost = lost;
  metric("ha.pg_outage.outage_ms", t1 - t0);
  metric("ha.pg_outage.spire_unhealthy_visible_ms", visibleMs);
  metric("ha.pg_outage.svid_renewals_during_outage", renewedDuring.join(","));
  metric("ha.pg_outage.svids_expired_during_outage", expiredDuring.length);
  metric("ha.pg_outage.devenv_start_to_healthy_ms", recoveryMs);
  metric("ha.pg_outage.healthy_after_start_poll_ms", recoveredMs);
  metric("ha.pg_outage.two_renewals_after_recovery_ms", renewedAfterMs);
  metric("ha.pg_outage.fleet_servers_restarted_by_start", restartedServers.join(",") || "none");
  metric("ha.pg_outage.robots_offline", offline.size);
  metric("ha.pg_outage.max_heartbeat_gap_at_broker_ms", gaps.join(","));
  metric("ha.pg_outage.heartbeats_lost", lost);
  metric("ha.pg_outage.entries_lost", missingEntries.length);
  observer.close();
  assert.deepEqual([...offline], [], "robots went offline during the outage");
  for (const [i, id] of ROBOTS.entries()) {
    assert.ok(gaps[i] < 5000, `${id}: no heartbeat at the broker for ${gaps[i]} ms`);
  }
});

test("PostgreSQL stopped for 30 s: the three fleet servers write every queued heartbeat afterwards", async () => {
  // Measured by the case above: the redelivered backlog is applied by the three replicas at
  // once, in any order (heartbeats count once per seq, robots locked in id order, deadlocks
  // retried: src/server/registry.ts, fleet.ts).
  await Promise.resolve();
  assert.ok(fleetLost !== undefined, "the outage case did not get that far");
  assert.equal(fleetLost, 0, `heartbeats lost across the outage: ${fleetOutcome.join("; ")}`);
});

/** The three fleet servers: devenv's component name, pid file, API port, MQTT client id. */
function fleetServers() {
  return [
    { name: "server", pidFile: stack.files.serverPid, port: stack.ports.http, n: 1 },
    { name: "server-2", pidFile: stack.files.server2Pid, port: stack.ports.http2!, n: 2 },
    { name: "server-3", pidFile: stack.files.server3Pid, port: stack.ports.http3!, n: 3 },
  ].map((x) => ({ ...x, clientId: x.n === 1 ? "k8s4r-server" : `k8s4r-server-${x.n}` }));
}

/** A request to fleet server `port`'s API as devenv's admin (the stack's helper is server 1's). */
async function apiAt<T>(port: number, path: string, init: RequestInit = {}) {
  const res = await fetch(`https://localhost:${port}${path}`, {
    ...init,
    headers: init.body !== undefined ? { "content-type": "application/json" } : undefined,
    client: await stack.operatorClient(),
    signal: AbortSignal.timeout(5000),
  });
  return { status: res.status, body: await res.json() as T };
}

/**
 * A stream of tasks, one every 150 ms through the given servers' APIs in turn, each appending
 * its number to `runs` on its robot (the robots run on this host): a line per run.
 */
/**
 * A file every task appends its number to. Tasks run as the task user (k8s4r-task), not as the
 * test: the file is made writable for it, in a directory of its own that it can reach (the stack's
 * directory is the test's, 0700).
 */
async function runsLog(name: string): Promise<string> {
  const dir = `${stack.dir}.runs`;
  await Deno.mkdir(dir, { recursive: true });
  await Deno.chmod(dir, 0o755);
  const path = `${dir}/${name}`;
  await Deno.writeTextFile(path, "");
  await Deno.chmod(path, 0o666);
  return path;
}

function taskStream(runs: string, via: () => number[]) {
  const created: { k: number; id: string; robot: string }[] = [];
  let stop = false;
  let k = 0;
  const done = (async () => {
    while (!stop) {
      const ports = via();
      const port = ports[k % ports.length];
      const robot = ROBOTS[k % ROBOTS.length];
      const n = k++;
      const r = await apiAt<{ id: string }>(port, `/api/robots/${robot}/tasks`, {
        method: "POST",
        body: JSON.stringify({
          command: ["sh", "-c", `echo ${n} >> ${runs} && echo ${n}`],
          timeoutSeconds: 30,
        }),
      }).catch(() => undefined);
      if (r?.status === 201) created.push({ k: n, id: r.body.id, robot });
      await new Promise((res) => setTimeout(res, 150));
    }
  })();
  return {
    created,
    async end() {
      stop = true;
      await done;
    },
  };
}

/** Every created task done with its own number as output; no number ran twice. */
async function checkRuns(
  runs: string,
  created: { k: number; id: string }[],
  readPort: number,
  label: string,
) {
  const unfinished: string[] = [];
  await waitFor(async () => {
    unfinished.length = 0;
    for (const t of created) {
      const v = await apiAt<{ state: string }>(readPort, `/api/tasks/${t.id}`);
      if (v.body.state !== "done") unfinished.push(`${t.k}:${v.body.state}`);
    }
    return unfinished.length === 0;
  }, { timeoutMs: 90_000, intervalMs: 500, what: `${label}: every task done` }).catch((err) => {
    throw new Error(`${(err as Error).message}: ${unfinished.join(", ")}`);
  });
  const lines = (await Deno.readTextFile(runs)).split("\n").filter(Boolean);
  const count = new Map<string, number>();
  for (const l of lines) count.set(l, (count.get(l) ?? 0) + 1);
  const twice = [...count].filter(([, n]) => n > 1).map(([l]) => l);
  const never = created.filter((t) => count.get(String(t.k)) !== 1).map((t) => t.k);
  for (const t of created) {
    const v = await apiAt<{ stdout: string }>(readPort, `/api/tasks/${t.id}`);
    assert.equal(v.body.stdout, `${t.k}\n`, `${label}: task ${t.k}'s output`);
  }
  assert.deepEqual(twice, [], `${label}: tasks ran twice`);
  assert.deepEqual(never, [], `${label}: tasks that did not run exactly once`);
  return { tasks: created.length, runs: lines.length };
}

test("kill -9 of one fleet server during a task stream: no task lost or run twice, no heartbeat lost", async () => {
  const servers = fleetServers();
  const stats = await Promise.all(
    servers.map((x) =>
      apiAt<{ replicas: { sweeper: boolean; replicas: unknown[] } }>(x.port, "/api/stats")
    ),
  );
  for (const [i, st] of stats.entries()) {
    assert.equal(st.status, 200, `${servers[i].name}: /api/stats ${st.status}`);
    assert.equal(st.body.replicas.replicas.length, 3, JSON.stringify(st.body.replicas));
  }
  // The victim: the sweeper (its lock, the sweep and the adoption all have to move).
  const vi = stats.findIndex((st) => st.body.replicas.sweeper);
  assert.ok(vi >= 0, "no fleet server is the sweeper");
  const victim = servers[vi];
  const survivors = servers.filter((x) => x !== victim);
  const hb0 = new Map<string, number>();
  for (const id of ROBOTS) {
    hb0.set(
      id,
      (await apiAt<RobotView>(survivors[0].port, `/api/robots/${id}`)).body.heartbeats.received,
    );
  }
  // Control: the same stream through all three, no kill: every task runs exactly once.
  const controlRuns = await runsLog("runs-control.log");
  const control = taskStream(controlRuns, () => servers.map((x) => x.port));
  await waitFor(() => control.created.length >= 12, {
    timeoutMs: 30_000,
    what: "12 control tasks created",
  });
  await control.end();
  const c = await checkRuns(controlRuns, control.created, survivors[0].port, "control");
  console.log(`  control: ${c.tasks} tasks through the 3 servers, ${c.runs} runs`);
  // The stream again; the sweeper is killed after 6 tasks.
  const runs = await runsLog("runs-kill.log");
  let dead = false;
  const stream = taskStream(
    runs,
    () => (dead ? survivors : servers).map((x) => x.port),
  );
  await waitFor(() => stream.created.length >= 6, { timeoutMs: 30_000, what: "6 tasks created" });
  const rec = stack.pid(victim.pidFile);
  assert.ok(rec, `${victim.name} is not running`);
  console.log(`  killing ${victim.name} (pid ${rec.pid}, the sweeper) with SIGKILL`);
  const t0 = Date.now();
  dead = true;
  Deno.kill(rec.pid, "SIGKILL");
  await waitFor(() => !isRecordAlive(rec), { timeoutMs: 10_000, what: `${victim.name} to die` });
  // Recovery: a survivor becomes the sweeper and adopts the victim's broker session.
  const adoptedMs = await timeUntil(
    async () => {
      for (const x of survivors) {
        const st = await apiAt<{ replicas: { sweeper: boolean; adopted: string[] } }>(
          x.port,
          "/api/stats",
        ).catch(() => undefined);
        if (st?.body.replicas.sweeper && st.body.replicas.adopted.includes(victim.clientId)) {
          return true;
        }
      }
      return false;
    },
    `a survivor to adopt ${victim.clientId}'s session`,
    30_000,
    100,
  );
  const createdAtKill = stream.created.length;
  await waitFor(() => stream.created.length >= createdAtKill + 12, {
    timeoutMs: 30_000,
    what: "12 more tasks after the kill",
  });
  await stream.end();
  const k = await checkRuns(runs, stream.created, survivors[0].port, "kill");
  const allDoneMs = Date.now() - t0;
  // Heartbeats: none missing, every robot online all along (seen by a survivor).
  let lost = 0;
  const written: string[] = [];
  for (const id of ROBOTS) {
    const v = (await apiAt<RobotView & { state: string }>(survivors[1].port, `/api/robots/${id}`))
      .body;
    assert.equal(v.state, "online", `${id} is ${v.state}`);
    lost += v.heartbeats.missing;
    written.push(`${id}: ${v.heartbeats.received - hb0.get(id)!} written`);
  }
  metric("ha.kill_server.adopted_after_ms", adoptedMs);
  metric("ha.kill_server.tasks", k.tasks);
  metric("ha.kill_server.tasks_created_before_kill", createdAtKill);
  metric("ha.kill_server.all_done_after_ms", allDoneMs);
  metric("ha.kill_server.heartbeats_lost", lost);
  console.log(`  heartbeats across the kill: ${written.join("; ")}`);
  assert.equal(lost, 0, "heartbeats were lost");
  // `devenv start` brings it back; it takes its session back from the adopter.
  const r = await stack.devenv(...stack.startArgs(), ...START_EXTRA.slice(2));
  stack.remember();
  assert.equal(r.code, 0, `devenv start: ${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout, new RegExp(`${victim.name}: pid \\d+ was gone, restarted`));
  await timeUntil(
    async () => {
      const st = await apiAt<{ replicas: { adopted: string[] } }>(survivors[0].port, "/api/stats");
      const st2 = await apiAt<{ replicas: { adopted: string[] } }>(survivors[1].port, "/api/stats");
      return ![...st.body.replicas.adopted, ...st2.body.replicas.adopted].includes(victim.clientId);
    },
    `${victim.clientId}'s session back with its owner`,
    30_000,
    200,
  );
});

/** When robot `id`'s SPIRE agent renews its own SVID next (at half its lifetime). */
async function agentRenewalDue(id: string): Promise<number> {
  const data = await readAgentData(robotLayout(stack.layout, id, stack.env).agentDataDir);
  const nb = data!.svid!.notBefore.getTime();
  return nb + (data!.svid!.notAfter.getTime() - nb) / 2;
}

/**
 * The SPIFFE ID of the agent SVID robot `id`'s SPIRE agent holds. A renewal keeps it; attesting
 * again with a join token gives a new one (spiffe://.../spire/agent/join_token/<new token>). The
 * serial is no test of that: an agent whose SVID passed half its 60 s life while the stack was
 * stopped renews it as soon as it is back.
 */
async function agentSvidId(id: string): Promise<string> {
  const dir = robotLayout(stack.layout, id, stack.env).agentDataDir;
  const data = JSON.parse(await Deno.readTextFile(`${dir}/agent-data.json`));
  const san = new X509Certificate(atob(data.svid[0])).subjectAltName ?? "";
  const uri = san.split(/,\s*/).find((s) => s.startsWith("URI:"));
  assert.ok(uri, `${id}: the agent SVID has no URI SAN (${san})`);
  return uri.slice(4);
}

test("backup of the running HA stack, restored onto a clean control host: the same robots come back", async () => {
  for (const w of watches.values()) w.close();
  watches.clear();
  // A SPIRE agent that renews its SVID between the backup and the stop would present a serial
  // the restored datastore does not know (SPIRE refuses it: a restore is only as fresh as the
  // backup). The test's agent SVIDs live 60 s: back up when no renewal is due for 8 s.
  await waitFor(async () => {
    for (const id of ROBOTS) if ((await agentRenewalDue(id)) - Date.now() < 8000) return false;
    return true;
  }, { timeoutMs: 60_000, intervalMs: 200, what: "8 s without an agent SVID renewal due" });
  const agentIds = new Map<string, string>();
  for (const id of ROBOTS) agentIds.set(id, await agentSvidId(id));
  const t0 = Date.now();
  const b = await stack.k8s4r(["backup", "create", "--output", "ha-backup-2"]);
  assert.equal(b.code, 0, b.stdout + b.stderr);
  metric("ha.backup.create_ms", Date.now() - t0);
  assert.equal((await stack.devenv("stop")).code, 0);
  assert.deepEqual(stack.survivors(), [], "processes still run after devenv stop");
  // A clean control host: only the robots' SPIRE agent data is left.
  const keep = new Set(ROBOTS.map((id) => robotLayout(stack.layout, id, stack.env).agentDataDir));
  for (const e of Deno.readDirSync(stack.layout.spireDataDir)) {
    const p = `${stack.layout.spireDataDir}/${e.name}`;
    if (!keep.has(p)) await Deno.remove(p, { recursive: true });
  }
  await Deno.remove(stack.layout.devEnvDir, { recursive: true });
  const r = await stack.k8s4r(["backup", "restore", "ha-backup-2"]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /start it: k8s4r devenv start --ha/);
  const t1 = Date.now();
  const s = await stack.devenv(...stack.startArgs(), ...START_EXTRA.slice(2));
  stack.remember();
  assert.equal(s.code, 0, `devenv start after the restore: ${s.stdout}\n${s.stderr}`);
  metric("ha.backup.start_after_restore_ms", Date.now() - t1);
  assert.match(s.stdout, /spire-database: .*restored from the backup/);
  assert.match(s.stdout, /fleet-database: .*restored from the backup/);
  assert.match(s.stdout, /identities: 1 join token\(s\)/, "a token for a robot");
  await stack.waitOnline(ROBOTS, 60_000);
  for (const id of ROBOTS) {
    assert.equal(await agentSvidId(id), agentIds.get(id), `${id} attested again`);
    await stack.waitHeartbeats(id, 2, 30_000);
  }
  const t = await stack.createTask("robot-001", ["echo", "restored"]);
  assert.equal((await stack.waitTask(t)).stdout, "restored\n");
});

test("teardown: stop and clean leave no process (PostgreSQL, haproxy, both SPIRE servers) and no port", async () => {
  for (const w of watches.values()) w.close();
  await stack.teardown();
  await Deno.remove(`${stack.dir}.runs`, { recursive: true }).catch(() => {});
});
