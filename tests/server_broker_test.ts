/**
 * The fleet server against a REAL mosquitto with the generated config: mTLS listener with the
 * robot ACL, loopback password listener for the server. Robots are plain mqtt.js clients with
 * test-CA certificates (the real agent is tested elsewhere).
 */
import assert from "node:assert/strict";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { join } from "node:path";
import { isRecordAlive, readPidFile, realRunner, waitFor } from "../src/process/mod.ts";
import { probeMqtt } from "../src/mqtt/probe.ts";
import { downTopic, robotSubscription, upTopic } from "../src/fleet/topics.ts";
import { FleetServer } from "../src/server/fleet_server.ts";
import type { PostgresConfig } from "../src/server/registry_postgres.ts";
import { openRegistry } from "../src/server/storage.ts";
import { svidTlsProvider } from "../src/server/svid_tls.ts";
import { StaticX509Source } from "../src/spiffe/source.ts";
import { parseX509SvidPem } from "../src/spiffe/svid.ts";
import { X509Bundle, X509BundleSet } from "../src/spiffe/bundle.ts";
import { TestHttps } from "../src/server/testing.ts";
import { TaskSigner } from "../src/mqtt/signed.ts";
import { parseJws, verifyJws } from "../src/spiffe/jws.ts";
import { fleetServerSpiffeId } from "../src/fleet/ids.ts";
import {
  type PemCert,
  startTestBroker,
  TEST_TRUST_DOMAIN,
  type TestBroker,
} from "./helpers/broker.ts";
import { startTestPostgres, type TestPostgres } from "./helpers/postgres.ts";
import { captureLog, ProtoRobot, registerMsg } from "./helpers/proto_robot.ts";

// mqtt.js keeps internal timers a little past end(); every process and client is closed below.
const opts = { sanitizeOps: false, sanitizeResources: false };

/** The HTTPS API's certificates (a test CA) and an operator client for it. */
const web = new TestHttps(TEST_TRUST_DOMAIN);

const now = () => new Date().toISOString();
const enc = (v: unknown) => JSON.stringify(v);

async function robot(b: TestBroker, id: string, cert?: PemCert): Promise<{
  client: MqttClient;
  received: { topic: string; payload: string }[];
}> {
  const c = cert ?? await b.issueCert(id);
  const client = await mqtt.connectAsync(b.tlsUrl, {
    key: c.key,
    cert: c.cert,
    ca: c.ca,
    servername: "localhost",
    rejectUnauthorized: true,
    clientId: `${id}-${crypto.randomUUID().slice(0, 6)}`,
    protocolVersion: 5,
    reconnectPeriod: 0,
    connectTimeout: 5000,
    will: {
      topic: upTopic(id, "status"),
      payload: Buffer.from(
        enc({
          v: 1,
          type: "status",
          robotId: id,
          ts: now(),
          status: "offline",
          reason: "connection lost",
        }),
      ),
      qos: 1,
      retain: true,
    },
  });
  const received: { topic: string; payload: string }[] = [];
  client.on("message", (topic, payload) => received.push({ topic, payload: payload.toString() }));
  return { client, received };
}

/** Where a test server keeps its registry: SQLite in a temp dir, or a real PostgreSQL. */
interface Store {
  kind: "sqlite" | "postgres";
  dataDir: string;
  postgres?: PostgresConfig;
  pgs?: TestPostgres;
  cleanup(): Promise<void>;
}

async function makeStore(kind: Store["kind"]): Promise<Store> {
  const dataDir = await Deno.makeTempDir({ prefix: "k8s4r-srv-" });
  const rm = () => Deno.remove(dataDir, { recursive: true });
  if (kind === "sqlite") return { kind, dataDir, cleanup: rm };
  const pgs = await startTestPostgres();
  const db = await pgs.createDatabase("srv");
  return {
    kind,
    dataDir,
    postgres: pgs.config(db),
    pgs,
    cleanup: async () => {
      await pgs.destroy();
      await rm();
    },
  };
}

async function startServer(
  b: TestBroker,
  dataDir: string,
  password = b.server.password,
  postgres?: PostgresConfig,
) {
  const fatal: Error[] = [];
  const server = await FleetServer.start({
    brokerUrl: b.plainUrl,
    username: b.server.username,
    password,
    dataDir,
    postgres,
    http: web.options(),
    // The server's SVID (TestHttps': spiffe://<td>/fleet-server) signs, as in production.
    fleet: { signer: new TaskSigner(web.source) },
    sweepIntervalMs: 200,
    reconnectPeriodMs: 200,
    onFatal: (e) => fatal.push(e),
  });
  return { server, fatal, api: server.http!.url };
}

/** The id of a signed task (the JWS payload, verified against the server's bundle). */
function signedTaskId(payload: string): string {
  const v = verifyJws(parseJws(JSON.parse(payload)), web.source);
  return JSON.parse(new TextDecoder().decode(v.payload)).id;
}

async function getJson(url: string) {
  return await web.json(url);
}

async function until(
  what: string,
  probe: () => boolean | Promise<boolean>,
  b: TestBroker,
  serverLog?: { lines: { at: number; msg: string }[] },
) {
  await waitFor(probe, { timeoutMs: 10_000, intervalMs: 50, what }).catch(async (err) => {
    const server = serverLog
      ? `\nserver log:\n${
        serverLog.lines.map((l) => `${new Date(l.at).toISOString()} ${l.msg}`).join("\n")
      }`
      : "";
    throw new Error(`${err.message}\nbroker log:\n${await b.logTail()}${server}`);
  });
}

Deno.test({
  name: "broker: server logs in on the loopback password listener; wrong password refused",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const dataDir = await Deno.makeTempDir({ prefix: "k8s4r-srv-" });
    try {
      // The plain listener is bound to 127.0.0.1 only (checked in the kernel's socket table).
      const tcp = await Deno.readTextFile("/proc/net/tcp");
      const hexPort = b.plainPort.toString(16).toUpperCase().padStart(4, "0");
      const listening = tcp.split("\n").filter((l) => / 0A /.test(l) && l.includes(`:${hexPort} `));
      assert.equal(listening.length, 1, "one listening socket on the plain port");
      assert.match(listening[0], new RegExp(`^\\s*\\d+: 0100007F:${hexPort} `));

      assert.equal((await probeMqtt({ port: b.plainPort, ...b.server })).ok, true);
      const wrong = await probeMqtt({ port: b.plainPort, ...b.server, password: "nope" });
      assert.equal(wrong.ok, false);
      assert.equal(wrong.returnCode, 5);
      const anon = await probeMqtt({ port: b.plainPort });
      assert.equal(anon.ok, false);

      const bad = await startServer(b, dataDir, "wrong-password");
      try {
        await until("the login to be refused", () => bad.fatal.length > 0, b);
        assert.match(bad.fatal[0].message, /Not authorized|Bad User Name or Password/i);
        assert.equal(bad.server.connected(), false);
      } finally {
        await bad.server.close();
      }
      const good = await startServer(b, dataDir);
      try {
        await good.server.waitConnected(10_000);
        const h = await getJson(`${good.api}/healthz`);
        assert.equal(h.status, 200);
        assert.equal(h.body.mqtt.connected, true);
      } finally {
        await good.server.close();
      }
    } finally {
      await b.stop();
      await Deno.remove(dataDir, { recursive: true });
    }
  },
});

Deno.test({
  name: "broker: TLS listener accepts TLS 1.2 and 1.3, refuses TLS 1.1",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    try {
      const c = await b.issueCert("robot-001");
      const sClient = (flag: string) =>
        realRunner.output("openssl", [
          "s_client",
          "-connect",
          `127.0.0.1:${b.tlsPort}`,
          "-CAfile",
          b.caFile,
          "-cert",
          c.certFile,
          "-key",
          c.keyFile,
          flag,
          "-cipher",
          "DEFAULT@SECLEVEL=0",
          "-brief", // prints "Protocol version: ..." right after the handshake
        ], { stdin: "", check: false, timeoutMs: 10_000 });
      const v13 = await sClient("-tls1_3");
      assert.match(v13.stdout + v13.stderr, /Protocol version: TLSv1\.3/);
      const v12 = await sClient("-tls1_2");
      assert.match(v12.stdout + v12.stderr, /Protocol version: TLSv1\.2/);
      const v11 = await sClient("-tls1_1");
      assert.equal(v11.success, false);
      // Refused by the broker (a protocol_version alert), not merely unsupported by the client.
      assert.match(v11.stdout + v11.stderr, /alert protocol version|unsupported protocol/i);
      assert.doesNotMatch(v11.stdout + v11.stderr, /no protocols available/);
    } finally {
      await b.stop();
    }
  },
});

Deno.test({
  name: "broker: ACL confines robots; malformed and mismatched payloads are counted and dropped",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const dataDir = await Deno.makeTempDir({ prefix: "k8s4r-srv-" });
    const { server, api } = await startServer(b, dataDir);
    const clients: MqttClient[] = [];
    try {
      await server.waitConnected(10_000);
      const r1 = await robot(b, "robot-001");
      const r2 = await robot(b, "robot-002");
      clients.push(r1.client, r2.client);
      const g1 = await r1.client.subscribeAsync(robotSubscription("robot-001"), { qos: 1 });
      assert.equal(g1[0].qos, 1);
      // robot-002 tries to read robot-001's tasks. mosquitto 2.0.11 grants the SUBSCRIBE itself
      // (acl_file checks `read` per message on delivery), so the proof is that nothing arrives.
      await r2.client.subscribeAsync(robotSubscription("robot-001"), { qos: 1 });
      await r2.client.subscribeAsync("k8s4r/robots/+/down/#", { qos: 1 });

      await r1.client.publishAsync(upTopic("robot-001", "register"), registerMsg("robot-001"), {
        qos: 1,
      });
      await r2.client.publishAsync(upTopic("robot-002", "register"), registerMsg("robot-002"), {
        qos: 1,
      });
      await until(
        "both robots registered",
        async () => (await getJson(`${api}/api/robots`)).body.robots.length === 2,
        b,
      );

      // robot-002 publishing as robot-001: refused by the broker (PUBACK 0x87), never seen.
      await assert.rejects(
        () =>
          r2.client.publishAsync(
            upTopic("robot-001", "status"),
            enc({ v: 1, type: "status", robotId: "robot-001", ts: now(), status: "offline" }),
            { qos: 1 },
          ),
        /Not authorized/i,
      );

      // A task for robot-001 reaches robot-001 only.
      const created = await web.fetch(`${api}/api/robots/robot-001/tasks`, {
        method: "POST",
        body: enc({ command: ["uname", "-a"], timeoutSeconds: 30 }),
      });
      assert.equal(created.status, 201);
      const { id } = await created.json();
      await until("robot-001 to receive its task", () => r1.received.length > 0, b);
      assert.equal(r1.received[0].topic, downTopic("robot-001", "task"));
      // Signed with the server's SVID over the exact message bytes (a JWS, not the bare JSON).
      const verified = verifyJws(parseJws(JSON.parse(r1.received[0].payload)), web.source);
      assert.equal(verified.signer.toString(), fleetServerSpiffeId(TEST_TRUST_DOMAIN));
      assert.equal(signedTaskId(r1.received[0].payload), id);

      // Malformed payload and robotId mismatch (robot-002 on its own topic claiming robot-001).
      await r2.client.publishAsync(upTopic("robot-002", "heartbeat"), "{not json", { qos: 1 });
      await r2.client.publishAsync(
        upTopic("robot-002", "heartbeat"),
        enc({
          v: 1,
          type: "heartbeat",
          robotId: "robot-001",
          ts: now(),
          seq: 1,
          svidExpiresAt: now(),
        }),
        { qos: 1 },
      );
      // The robot reports the task result; a sync point for everything sent before it.
      for (const state of ["accepted", "running", "done"]) {
        await r1.client.publishAsync(
          upTopic("robot-001", "task"),
          enc({
            v: 1,
            type: "task-status",
            robotId: "robot-001",
            ts: now(),
            taskId: id,
            state,
            exitCode: 0,
            stdout: "Linux\n",
          }),
          { qos: 1 },
        );
      }
      await until(
        "task done",
        async () => (await getJson(`${api}/api/tasks/${id}`)).body.state === "done",
        b,
      );
      const task = (await getJson(`${api}/api/tasks/${id}`)).body;
      assert.equal(task.stdout, "Linux\n");
      assert.equal(task.exitCode, 0);
      const stats = (await getJson(`${api}/api/stats`)).body;
      assert.equal(stats.messages.dropped["bad-json"], 1);
      assert.equal(stats.messages.dropped["robot-id-mismatch"], 1);
      assert.equal(r2.received.length, 0, "robot-002 never saw robot-001's task");
      const r1view = (await getJson(`${api}/api/robots/robot-001`)).body;
      assert.equal(r1view.online, true, "robot-002's forged offline status never arrived");

      // Last will: robot-001 dies without DISCONNECT; its retained offline status arrives.
      r1.client.stream.destroy();
      await until(
        "robot-001 offline by last will",
        async () => (await getJson(`${api}/api/robots/robot-001`)).body.online === false,
        b,
      );
      assert.equal(
        (await getJson(`${api}/api/robots/robot-001`)).body.offlineReason,
        "connection lost",
      );
    } finally {
      for (const c of clients) await c.endAsync(true).catch(() => {});
      await server.close();
      await b.stop();
      await Deno.remove(dataDir, { recursive: true });
    }
  },
});

for (const kind of ["sqlite", "postgres"] as const) {
  Deno.test({
    name:
      `broker [${kind}]: server restart keeps registry and pending tasks; persistent session survives`,
    ...opts,
    async fn() {
      const b = await startTestBroker();
      const store = await makeStore(kind);
      const { dataDir } = store;
      const clients: MqttClient[] = [];
      let current = await startServer(b, dataDir, undefined, store.postgres);
      try {
        await current.server.waitConnected(10_000);
        const cert = await b.issueCert("robot-001");
        let r1 = await robot(b, "robot-001", cert);
        clients.push(r1.client);
        await r1.client.publishAsync(upTopic("robot-001", "register"), registerMsg("robot-001"), {
          qos: 1,
        });
        await until(
          "registered",
          async () => (await getJson(`${current.api}/api/robots/robot-001`)).status === 200,
          b,
        );
        // Goes offline cleanly.
        await r1.client.publishAsync(
          upTopic("robot-001", "status"),
          enc({
            v: 1,
            type: "status",
            robotId: "robot-001",
            ts: now(),
            status: "offline",
            reason: "shutdown",
          }),
          { qos: 1, retain: true },
        );
        await r1.client.endAsync();
        await until(
          "offline",
          async () => (await getJson(`${current.api}/api/robots/robot-001`)).body.online === false,
          b,
        );
        const created = await web.fetch(`${current.api}/api/robots/robot-001/tasks`, {
          method: "POST",
          body: enc({ command: ["true"] }),
        });
        const { id } = await created.json();
        assert.equal((await getJson(`${current.api}/api/tasks/${id}`)).body.state, "pending");

        // Server down. A message a robot sends meanwhile is queued in the server's session.
        await current.server.close();
        const r2 = await robot(b, "robot-002");
        clients.push(r2.client);
        await r2.client.publishAsync(upTopic("robot-002", "register"), registerMsg("robot-002"), {
          qos: 1,
        });

        // The broker is killed -9 and restarted: its persistence (autosave 1 s) has the session,
        // once a save newer than the acknowledged register is on disk. (An older file may already
        // exist: on a slow machine the first autosave can come before the register.)
        const since = Date.now();
        await waitFor(async () => {
          try {
            return ((await Deno.stat(`${b.files.persistenceDir}/mosquitto.db`)).mtime?.getTime() ??
              0) > since;
          } catch {
            return false;
          }
        }, { timeoutMs: 10_000, what: "a mosquitto autosave after the register" });
        await r2.client.endAsync(true);
        await b.kill9();
        await b.start();

        current = await startServer(b, dataDir, undefined, store.postgres);
        await current.server.waitConnected(10_000);
        // Registry and pending task survived the restart.
        assert.equal(
          (await getJson(`${current.api}/api/robots/robot-001`)).body.spiffeId,
          `spiffe://${TEST_TRUST_DOMAIN}/robot/robot-001`,
        );
        assert.equal((await getJson(`${current.api}/api/tasks/${id}`)).body.state, "pending");
        // The register robot-002 sent while the server was down is delivered from the session.
        await until(
          "robot-002's queued register",
          async () => (await getJson(`${current.api}/api/robots/robot-002`)).status === 200,
          b,
        );

        // robot-001 returns: the pending task is delivered.
        r1 = await robot(b, "robot-001", cert);
        clients.push(r1.client);
        await r1.client.subscribeAsync(robotSubscription("robot-001"), { qos: 1 });
        await r1.client.publishAsync(upTopic("robot-001", "register"), registerMsg("robot-001"), {
          qos: 1,
        });
        await until(
          "the pending task delivered",
          () => r1.received.some((m) => signedTaskId(m.payload) === id),
          b,
        );
        await until(
          "dispatched",
          async () => (await getJson(`${current.api}/api/tasks/${id}`)).body.state === "dispatched",
          b,
        );
      } finally {
        for (const c of clients) await c.endAsync(true).catch(() => {});
        await current.server.close();
        await b.stop();
        await store.cleanup();
      }
    },
  });
}

Deno.test({
  name: "broker: server over mqtts:// with an SVID, broker authorized by SPIFFE ID",
  ...opts,
  async fn() {
    const b = await startTestBroker({ tlsAdminUsers: ["k8s4r-server"] });
    const dataDir = await Deno.makeTempDir({ prefix: "k8s4r-srv-" });
    try {
      const mk = async (brokerId: string) => {
        const c = await b.issueCert("k8s4r-server", {
          spiffeId: `spiffe://${TEST_TRUST_DOMAIN}/k8s4r-server`,
        });
        const source = new StaticX509Source(
          parseX509SvidPem(c.cert, c.key),
          new X509BundleSet([X509Bundle.fromPem(TEST_TRUST_DOMAIN, c.ca)]),
        );
        return await FleetServer.start({
          brokerUrl: b.tlsUrl,
          tls: svidTlsProvider(source, brokerId),
          dataDir,
          http: false,
          fleet: { signer: new TaskSigner(source) },
          reconnectPeriodMs: 200,
        });
      };
      const wrong = await mk(`spiffe://${TEST_TRUST_DOMAIN}/not-the-broker`);
      try {
        // The first TLS attempt fails on the broker's ID; wait for that error, however slow the
        // machine, then check the server never got connected.
        await waitFor(
          () => /spiffe:\/\/k8s4r\.test\/mqtt-broker/.test(wrong.state.lastError ?? ""),
          {
            timeoutMs: 10_000,
            what: "the broker-ID mismatch error",
          },
        );
        await assert.rejects(() => wrong.waitConnected(500), /not connected/);
      } finally {
        await wrong.close();
      }
      const server = await mk(b.brokerSpiffeId);
      try {
        await server.waitConnected(10_000);
        const r1 = await robot(b, "robot-001");
        await r1.client.publishAsync(upTopic("robot-001", "register"), registerMsg("robot-001"), {
          qos: 1,
        });
        await until(
          "register over mqtts",
          async () => (await server.registry.getRobot("robot-001")) !== undefined,
          b,
        );
        await r1.client.endAsync(true);
      } finally {
        await server.close();
      }
    } finally {
      await b.stop();
      await Deno.remove(dataDir, { recursive: true });
    }
  },
});

// ---------------------------------------------------------------------------------------------
// Issue 10: last will, broker outage, bounded close, unacknowledged registry errors.

async function startLoggedServer(
  b: TestBroker,
  dataDir: string,
  extra: {
    sweepIntervalMs?: number;
    fleet?: Record<string, unknown>;
    postgres?: PostgresConfig;
  } = {},
) {
  const log = captureLog();
  const server = await FleetServer.start({
    brokerUrl: b.plainUrl,
    username: b.server.username,
    password: b.server.password,
    dataDir,
    postgres: extra.postgres,
    http: web.options(),
    sweepIntervalMs: extra.sweepIntervalMs ?? 100,
    reconnectPeriodMs: 200,
    logger: log.logger,
    fleet: { signer: new TaskSigner(web.source), ...extra.fleet },
  });
  await server.waitConnected(10_000);
  return { server, api: server.http!.url, log };
}

Deno.test({
  name: "broker: the last will of the current connection marks a crashed robot offline at once",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const dataDir = await Deno.makeTempDir({ prefix: "k8s4r-srv-" });
    let s = await startLoggedServer(b, dataDir);
    const robots: ProtoRobot[] = [];
    const view = async (id: string) => (await getJson(`${s.api}/api/robots/${id}`)).body;
    try {
      // Heartbeats every 30 s: the fallback (3 missed = 90 s) cannot be what marks it offline.
      const crashing = await ProtoRobot.start(b, "robot-001");
      const flaky = await ProtoRobot.start(b, "robot-002", { reconnectPeriodMs: 100 });
      robots.push(crashing, flaky);
      await until("both online", async () => {
        const a = await view("robot-001");
        const c = await view("robot-002");
        return a.online === true && c.online === true;
      }, b);

      // kill -9 of the agent: the broker publishes the will of connection 1, which is newer
      // than the retained online of connection 1 (the will's ts is older: set at CONNECT).
      crashing.crash();
      await until("robot-001 offline by its last will", async () => {
        const v = await view("robot-001");
        return v.online === false;
      }, b);
      const dead = await view("robot-001");
      assert.equal(dead.offlineReason, "connection lost");
      assert.equal(dead.state, "offline");

      // Positive control: robot-002 loses its socket and reconnects at once. The will of
      // connection 1 arrives around the register of connection 2; connection 2 wins.
      flaky.client.stream.destroy();
      await until("robot-002 reconnected", () => flaky.connects >= 2, b);
      await until("robot-002 online on its new connection", async () => {
        const v = await view("robot-002");
        return v.online === true && v.connection === flaky.connection && v.connection >= 2;
      }, b);
      const back = await view("robot-002");
      assert.equal(back.state, "online");
      assert.equal(back.offlineReason, null);

      // Retained replays (every subscribe) change nothing, and do not refresh lastSeen.
      const before = (await getJson(`${s.api}/api/robots`)).body.robots;
      await s.server.close();
      s = await startLoggedServer(b, dataDir);
      await until(
        "the retained statuses replayed",
        async () => (await getJson(`${s.api}/api/stats`)).body.messages.received.status >= 2,
        b,
      );
      const after = (await getJson(`${s.api}/api/robots`)).body.robots;
      assert.deepEqual(
        after.map((r: Record<string, unknown>) => [r.id, r.online, r.lastSeen, r.offlineReason]),
        before.map((r: Record<string, unknown>) => [r.id, r.online, r.lastSeen, r.offlineReason]),
      );
      const stats = (await getJson(`${s.api}/api/stats`)).body.messages;
      assert.equal(stats.statusReplays, 2, "both retained statuses counted as replays");
    } finally {
      for (const r of robots) await r.close();
      await s.server.close();
      await b.stop();
      await Deno.remove(dataDir, { recursive: true });
    }
  },
});

Deno.test({
  name: "broker: an outage of the broker marks no robot offline; state is unknown, then re-derived",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const dataDir = await Deno.makeTempDir({ prefix: "k8s4r-srv-" });
    const s = await startLoggedServer(b, dataDir);
    const robots: ProtoRobot[] = [];
    const view = async (id: string) => (await getJson(`${s.api}/api/robots/${id}`)).body;
    try {
      // 1 s heartbeats: offline after 3 s of silence.
      const alive = await ProtoRobot.start(b, "robot-001", {
        reconnectPeriodMs: 200,
        heartbeatIntervalSeconds: 1,
      });
      const dying = await ProtoRobot.start(b, "robot-002", {
        reconnectPeriodMs: 200,
        heartbeatIntervalSeconds: 1,
      });
      robots.push(alive, dying);
      alive.startHeartbeats();
      dying.startHeartbeats();
      await until("heartbeats from both", async () => {
        const a = await view("robot-001");
        const d = await view("robot-002");
        return a.heartbeats.received >= 1 && d.heartbeats.received >= 1;
      }, b);

      await b.kill9();
      const seqAtKill = alive.seq;
      // robot-002 dies during the outage (no will: the broker is down); robot-001 keeps going.
      dying.crash();
      // Longer than 3 heartbeat intervals: robot-001 buffered 5 heartbeats meanwhile.
      await waitFor(() => alive.seq >= seqAtKill + 5, {
        timeoutMs: 15_000,
        what: "5 heartbeats buffered by robot-001 during the outage",
      });
      for (const id of ["robot-001", "robot-002"]) {
        const v = await view(id);
        assert.equal(v.online, true, `${id} was marked offline during the outage`);
        assert.equal(v.state, "unknown", `${id}: state during the outage`);
        assert.ok(Date.parse(v.unknownSince) > 0, `${id}: unknownSince ${v.unknownSince}`);
      }
      const health = (await getJson(`${s.api}/healthz`)).body;
      assert.equal(health.mqtt.connected, false);
      assert.equal(health.robots.unknown, 2);

      await b.start();
      await s.server.waitConnected(10_000);
      const upSince = Date.parse((await getJson(`${s.api}/healthz`)).body.mqtt.since);
      assert.ok(upSince > 0);
      // Re-derived: robot-001 is back on a new connection, and its buffered heartbeats arrive.
      await until("robot-001 back on a new connection", async () => {
        const v = await view("robot-001");
        return v.state === "online" && v.connection === alive.connection &&
          v.connection > 1 && v.heartbeats.received >= seqAtKill + 5;
      }, b).catch(async (err) => {
        throw new Error(`${err.message}\n${JSON.stringify(await view("robot-001"))}`);
      });
      // robot-002 never returns: the heartbeat fallback marks it offline, with a full grace
      // (3 x 1 s) counted from the reconnect, not from its last heartbeat.
      await until("robot-002 offline by missed heartbeats", async () => {
        const v = await view("robot-002");
        return v.state === "offline";
      }, b);
      assert.equal((await view("robot-002")).offlineReason, "missed 3 heartbeats");
      const marked = s.log.lines.filter((l) => /robot robot-002 is offline/.test(l.msg));
      assert.equal(marked.length, 1, JSON.stringify(s.log.lines));
      assert.ok(
        marked[0].at - upSince >= 3000,
        `robot-002 marked offline ${marked[0].at - upSince} ms after the reconnect`,
      );
      assert.deepEqual(
        s.log.lines.filter((l) => /robot robot-001 is offline/.test(l.msg)),
        [],
        "robot-001 was never marked offline",
      );
      assert.equal((await view("robot-001")).state, "online");
    } finally {
      for (const r of robots) await r.close();
      await s.server.close();
      await b.stop();
      await Deno.remove(dataDir, { recursive: true });
    }
  },
});

/** SIGSTOP/SIGCONT of the test broker, by the pid (and start time) in its own pid file. */
function signalBroker(b: TestBroker, sig: Deno.Signal) {
  const rec = readPidFile(join(b.dir, "mosquitto.pid"));
  if (!rec || !isRecordAlive(rec)) throw new Error("the test broker is not running");
  Deno.kill(rec.pid, sig);
}

Deno.test({
  name:
    "broker: a frozen broker (SIGSTOP 5 s) marks nobody offline; silence before it still counts",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const dataDir = await Deno.makeTempDir({ prefix: "k8s4r-srv-" });
    const s = await startLoggedServer(b, dataDir);
    const robots: ProtoRobot[] = [];
    const view = async (id: string) => (await getJson(`${s.api}/api/robots/${id}`)).body;
    let frozen = false;
    try {
      const alive = await ProtoRobot.start(b, "robot-001", { heartbeatIntervalSeconds: 1 });
      const silent = await ProtoRobot.start(b, "robot-002", { heartbeatIntervalSeconds: 1 });
      robots.push(alive, silent);
      alive.startHeartbeats();
      silent.startHeartbeats();
      await until("heartbeats from both, probes echoed", async () => {
        const h = (await getJson(`${s.api}/healthz`)).body;
        return h.mqtt.delivering === true &&
          (await view("robot-001")).heartbeats.received >= 1 &&
          (await view("robot-002")).heartbeats.received >= 1;
      }, b);
      // Positive control: robot-002 stays connected but says nothing from now on.
      silent.stopHeartbeats();
      const silentSince = Date.now();
      signalBroker(b, "SIGSTOP");
      frozen = true;
      const frozenAt = Date.now();
      // Longer than 3 heartbeat intervals: every robot is silent as seen from the server.
      await until("state unknown while the broker is frozen", async () => {
        const v = await view("robot-001");
        return v.state === "unknown" && Date.now() - frozenAt > 5000;
      }, b);
      const health = (await getJson(`${s.api}/healthz`)).body;
      assert.equal(health.mqtt.connected, true, "the TCP connection stays up");
      assert.equal(health.mqtt.delivering, false);
      for (const id of ["robot-001", "robot-002"]) {
        assert.equal((await view(id)).online, true, `${id} was marked offline while frozen`);
      }
      signalBroker(b, "SIGCONT");
      frozen = false;
      await until(
        "robot-002 offline by missed heartbeats after the freeze",
        async () => (await view("robot-002")).state === "offline",
        b,
      );
      assert.equal((await view("robot-002")).offlineReason, "missed 3 heartbeats");
      assert.ok(Date.now() - silentSince >= 3000);
      await until("robot-001 online, its queued heartbeats in", async () => {
        const v = await view("robot-001");
        return v.state === "online" && v.heartbeats.received >= alive.seq - 1;
      }, b);
      assert.deepEqual(
        s.log.lines.filter((l) => /robot robot-001 is offline/.test(l.msg)),
        [],
        "robot-001 was never marked offline",
      );
      assert.equal((await view("robot-001")).heartbeats.missing, 0);
    } finally {
      if (frozen) signalBroker(b, "SIGCONT");
      for (const r of robots) await r.close();
      await s.server.close();
      await b.stop();
      await Deno.remove(dataDir, { recursive: true });
    }
  },
});

Deno.test({
  name: "broker: close() returns while a QoS 1 dispatch is in flight to a frozen broker",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const dataDir = await Deno.makeTempDir({ prefix: "k8s4r-srv-" });
    const s = await startLoggedServer(b, dataDir);
    const robot = await ProtoRobot.start(b, "robot-001");
    let frozen = false;
    let closing: Promise<void> | undefined;
    try {
      await robot.client.subscribeAsync(robotSubscription("robot-001"), { qos: 1 });
      await until(
        "robot online",
        async () => (await getJson(`${s.api}/api/robots/robot-001`)).body.online === true,
        b,
      );
      signalBroker(b, "SIGSTOP");
      frozen = true;
      const created = await web.fetch(`${s.api}/api/robots/robot-001/tasks`, {
        method: "POST",
        body: enc({ command: ["true"] }),
      });
      assert.equal(created.status, 201);
      const { id } = await created.json();
      // The PUBLISH is written; its PUBACK will not come while the broker is stopped.
      await waitFor(() => Object.keys(s.server.client.outgoing).length > 0, {
        timeoutMs: 5000,
        what: "the task's PUBLISH in flight",
      });
      let closed = false;
      closing = s.server.close().then(() => {
        closed = true;
      });
      await waitFor(() => closed, { timeoutMs: 15_000, what: "close() to return" });
      signalBroker(b, "SIGCONT");
      frozen = false;
      // Nothing was lost: the task is still pending in the registry, and a new server sends it.
      const reg = await openRegistry({ kind: "sqlite", dataDir });
      try {
        assert.equal((await reg.getTask(id))?.state, "pending");
      } finally {
        await reg.close();
      }
      const again = await startLoggedServer(b, dataDir);
      try {
        await until("the task dispatched after restart", async () => {
          return (await getJson(`${again.api}/api/tasks/${id}`)).body.state === "dispatched";
        }, b);
      } finally {
        await again.server.close();
      }
    } finally {
      if (frozen) signalBroker(b, "SIGCONT");
      await closing;
      await robot.close();
      await s.server.close();
      await b.stop();
      await Deno.remove(dataDir, { recursive: true });
    }
  },
});

for (const kind of ["sqlite", "postgres"] as const) {
  Deno.test({
    name: `broker [${kind}]: a registry write error is not acknowledged; the broker redelivers it`,
    ...opts,
    async fn() {
      const b = await startTestBroker();
      const store = await makeStore(kind);
      const { dataDir } = store;
      const s = await startLoggedServer(b, dataDir, { postgres: store.postgres });
      const robot = await ProtoRobot.start(b, "robot-001");
      const view = async () => (await getJson(`${s.api}/api/robots/robot-001`)).body;
      try {
        await until("registered", async () => (await view()).online === true, b);
        // The registry fails the next 3 heartbeat writes, after writing (so they are rolled back).
        let failures = 3;
        s.server.registry.setStatementHook((sql) => {
          if (/heartbeats_received = heartbeats_received \+ 1/.test(sql) && failures > 0) {
            failures--;
            throw new Error("disk I/O error (injected)");
          }
        });
        // Heartbeats without bootId are not deduplicated: each one applied twice counts twice.
        const hb = (seq: number) =>
          robot.client.publishAsync(
            upTopic("robot-001", "heartbeat"),
            enc({
              v: 1,
              type: "heartbeat",
              robotId: "robot-001",
              ts: now(),
              seq,
              svidExpiresAt: now(),
            }),
            { qos: 1 },
          );
        await hb(1);
        await hb(2);
        let last: unknown;
        await until(
          "both heartbeats in the registry",
          async () => {
            last = await view();
            return (last as { heartbeats: { received: number } }).heartbeats.received === 2;
          },
          b,
          s.log,
        ).catch((err) => {
          throw new Error(`${err.message}\nlast view: ${JSON.stringify(last)}`);
        });
        assert.equal(failures, 0);
        // A sync point: anything redelivered again would arrive before it.
        await hb(3);
        await until("the third heartbeat", async () => (await view()).heartbeats.received >= 3, b);
        assert.equal((await view()).heartbeats.received, 3, "each heartbeat applied exactly once");
        const stats = (await getJson(`${s.api}/api/stats`)).body.messages;
        assert.equal(stats.applyErrors, 3);
        assert.ok(s.server.state.connects >= 2, "the connection was cycled for redelivery");
        assert.equal(s.server.registry.dialect, kind);
      } finally {
        await robot.close();
        await s.server.close();
        await b.stop();
        await store.cleanup();
      }
    },
  });
}

Deno.test({
  name: "broker [postgres]: PostgreSQL stopped: nothing is acknowledged; once back, all is written",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const store = await makeStore("postgres");
    const s = await startLoggedServer(b, store.dataDir, { postgres: store.postgres });
    const robot = await ProtoRobot.start(b, "robot-001");
    const view = async () => (await getJson(`${s.api}/api/robots/robot-001`)).body;
    try {
      await until("registered", async () => (await view()).online === true, b);
      const hb = (seq: number) =>
        robot.client.publishAsync(
          upTopic("robot-001", "heartbeat"),
          enc({
            v: 1,
            type: "heartbeat",
            robotId: "robot-001",
            ts: now(),
            seq,
            svidExpiresAt: now(),
          }),
          { qos: 1 },
        );
      await hb(1);
      await until("the first heartbeat", async () => (await view()).heartbeats.received === 1, b);
      await store.pgs!.cluster.stop();
      // The broker takes them (PUBACK to the robot); the server cannot commit them.
      for (const seq of [2, 3, 4]) await hb(seq);
      await until(
        "a failed commit (not acknowledged)",
        () => s.log.lines.some((l) => /failed to apply heartbeat .*not acknowledged/.test(l.msg)),
        b,
      );
      const errorsDown = s.server.fleet.stats.applyErrors;
      assert.ok(errorsDown >= 1);
      await store.pgs!.cluster.start();
      await until("the queued heartbeats", async () => {
        const r = await web.fetch(`${s.api}/api/robots/robot-001`);
        if (r.status !== 200) {
          await r.body?.cancel();
          return false;
        }
        return (await r.json()).heartbeats.received >= 4;
      }, b);
      // Each one written once: a sync point after them shows nothing more comes.
      await hb(5);
      await until("the fifth heartbeat", async () => (await view()).heartbeats.received >= 5, b);
      assert.equal((await view()).heartbeats.received, 5);
      assert.ok(s.server.state.connects >= 2, "the connection was cycled for redelivery");
    } finally {
      await robot.close();
      await s.server.close();
      await b.stop();
      await store.cleanup();
    }
  },
});

Deno.test({
  name:
    "broker: after a failed write, what is redelivered before mqtt.js emits 'connect' is applied",
  ...opts,
  async fn() {
    // mqtt.js sets `connected` at CONNACK but emits 'connect' only once its outgoing store is
    // flushed (async): the broker's redelivered PUBLISHes can be handled in between. They come
    // on the new connection and must be applied, not dropped as if still on the old one.
    const b = await startTestBroker();
    const store = await makeStore("sqlite");
    const s = await startLoggedServer(b, store.dataDir);
    const robot = await ProtoRobot.start(b, "robot-001");
    const view = async () => (await getJson(`${s.api}/api/robots/robot-001`)).body;
    const client = s.server.client;
    const emit = client.emit.bind(client) as (event: string, ...args: unknown[]) => boolean;
    let hold = false;
    const held: unknown[][] = [];
    client.emit = ((event: string, ...args: unknown[]) => {
      if (event === "connect" && hold) {
        held.push(args);
        return true;
      }
      return emit(event, ...args);
    }) as typeof client.emit;
    try {
      await until("registered", async () => (await view()).online === true, b);
      let failures = 1;
      s.server.registry.setStatementHook((sql) => {
        if (/heartbeats_received = heartbeats_received \+ 1/.test(sql) && failures-- > 0) {
          throw new Error("disk I/O error (injected)");
        }
      });
      hold = true;
      await robot.client.publishAsync(
        upTopic("robot-001", "heartbeat"),
        enc({
          v: 1,
          type: "heartbeat",
          robotId: "robot-001",
          ts: now(),
          seq: 1,
          svidExpiresAt: now(),
        }),
        { qos: 1 },
      );
      await until(
        "the reconnect (CONNACK) after the failed write",
        () => {
          return s.server.state.connects >= 1 && held.length === 1 && client.connected;
        },
        b,
        s.log,
      );
      // Positive control is the test above (applied once 'connect' ran); here it has not run.
      await until(
        "the redelivered heartbeat applied on the new connection",
        async () => (await view()).heartbeats.received === 1,
        b,
        s.log,
      );
    } finally {
      hold = false;
      for (const a of held) emit("connect", ...a);
      await robot.close();
      await s.server.close();
      await b.stop();
      await store.cleanup();
    }
  },
});
