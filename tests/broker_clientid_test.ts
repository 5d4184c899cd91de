/**
 * Session takeover by client id, on a REAL Mosquitto with the configuration k8s4r generates.
 *
 * MQTT lets a new CONNECT with an existing client id take that session over: the old connection
 * is closed (MQTT 5 DISCONNECT 0x8E) and, with a clean start, the session and the messages
 * queued in it are deleted. Mosquitto does not check certificate clients at CONNECT (neither
 * the ACL nor the dynamic-security plugin, which only answers for topics), so without
 * `use_username_as_clientid` on the TLS listener any robot certificate, even a removed one,
 * could choose the fleet server's client id (`k8s4r-server`) or another robot's, kick it and
 * wipe its persistent session. With it, a certificate client's id is its CN (its robot id): it
 * can only ever take over its own session.
 *
 * Controls: without an attack the same checks pass, and the rightful owner still takes over its
 * own session (so "no close" is seen because nothing was taken, not because closes go unseen).
 */
import assert from "node:assert/strict";
import mqtt from "mqtt";
import type { IClientOptions, MqttClient } from "mqtt";
import { downTopic, robotSubscription, SERVER_SUBSCRIPTION } from "../src/fleet/topics.ts";
import { SERVER_CLIENT_ID } from "../src/server/fleet_server.ts";
import { cutOffUsername, DynsecAdmin } from "../src/mqtt/dynsec.ts";
import { waitFor } from "../src/process/mod.ts";
import { type PemCert, startTestBroker, type TestBroker } from "./helpers/broker.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

function tlsClient(
  b: TestBroker,
  cert: PemCert,
  clientId: string,
  extra: IClientOptions = {},
  /** Collects every payload delivered, from the first packet after CONNACK on. */
  sink?: string[],
): Promise<MqttClient> {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(b.tlsUrl, {
      key: cert.key,
      cert: cert.cert,
      ca: cert.ca,
      servername: "localhost",
      clientId,
      protocolVersion: 5,
      reconnectPeriod: 0,
      connectTimeout: 5000,
      ...extra,
    });
    if (sink) c.on("message", (_t, p) => sink.push(String(p)));
    c.once("connect", (p) => {
      connacks.set(c, { sessionPresent: p.sessionPresent });
      resolve(c);
    });
    c.once("error", (e) => {
      c.end(true);
      reject(e);
    });
    c.once("close", () => reject(new Error(`${clientId}: closed before CONNACK`)));
  });
}

/** A persistent robot session: clean=false, 1 h expiry, subscribed to its own down/#. */
function robotSession(
  b: TestBroker,
  cert: PemCert,
  id: string,
  sink?: string[],
): Promise<MqttClient> {
  return tlsClient(b, cert, id, {
    clean: false,
    properties: { sessionExpiryInterval: 3600 },
  }, sink);
}

type Attack = "none" | "live robot" | "removed robot";

/**
 * The fleet server (clean=false, subscribed) is connected; robot-001 is offline with a task
 * queued in its persistent session. Then robot-666 connects as `k8s4r-server` and as
 * `robot-001` (unless `attack` is "none"). Returns what the victims saw.
 */
async function scenario(attack: Attack) {
  const b = await startTestBroker();
  const clients: MqttClient[] = [];
  try {
    const [c1, c666] = [await b.issueCert("robot-001"), await b.issueCert("robot-666")];
    const server = await mqtt.connectAsync(b.plainUrl, {
      ...b.server,
      clientId: SERVER_CLIENT_ID,
      clean: false,
      protocolVersion: 5,
      properties: { sessionExpiryInterval: 3600 },
      reconnectPeriod: 0,
    });
    clients.push(server);
    let serverCloses = 0;
    server.on("close", () => serverCloses++);
    const atServer: string[] = [];
    server.on("message", (_t, p) => atServer.push(String(p)));
    await server.subscribeAsync([SERVER_SUBSCRIPTION, "k8s4r/test/marker"], { qos: 1 });

    // robot-001's persistent session, then offline with a task queued for it.
    const r1 = await robotSession(b, c1, "robot-001");
    await r1.subscribeAsync(robotSubscription("robot-001"), { qos: 1 });
    await r1.endAsync();
    const queued = `queued-${crypto.randomUUID().slice(0, 8)}`;
    await server.publishAsync(downTopic("robot-001", "task"), queued, { qos: 1 });

    const attackerConnacks: number[] = [];
    if (attack !== "none") {
      if (attack === "removed robot") {
        const admin = await DynsecAdmin.connect({ port: b.plainPort, ...b.admin });
        try {
          await cutOffUsername(admin, "robot-666");
        } finally {
          await admin.close();
        }
      }
      // Each attempt is a real CONNECT that the broker accepts (a removed robot too: certificate
      // clients are not checked at CONNECT), so the attack is tried, not refused by TLS.
      for (const victim of [SERVER_CLIENT_ID, "robot-001"]) {
        const a = await tlsClient(b, c666, victim, { clean: true });
        clients.push(a);
        attackerConnacks.push(a.connected ? 0 : -1);
      }
    }

    // The server's connection still delivers: a marker it publishes to itself comes back.
    const marker = `marker-${crypto.randomUUID().slice(0, 8)}`;
    if (server.connected) {
      await server.publishAsync("k8s4r/test/marker", marker, { qos: 1 }).catch(() => {});
    }
    let serverDelivers = true;
    await waitFor(() => {
      if (serverCloses > 0 || !server.connected) return true;
      return atServer.includes(marker);
    }, { timeoutMs: 10_000, intervalMs: 10, what: "the server's marker or its close" });
    if (serverCloses > 0 || !atServer.includes(marker)) serverDelivers = false;

    // robot-001 comes back: its session and the task queued before the attack are there.
    const got: string[] = [];
    const back = await robotSession(b, c1, "robot-001", got);
    clients.push(back);
    const sessionPresent = sessionPresentOf(back);
    // Delivery to one session is in order: once a task sent now arrives, the queued one would
    // have arrived before it.
    const after = `after-${crypto.randomUUID().slice(0, 8)}`;
    if (!sessionPresent) await back.subscribeAsync(robotSubscription("robot-001"), { qos: 1 });
    if (server.connected) {
      await server.publishAsync(downTopic("robot-001", "task"), after, { qos: 1 });
    } else {
      const s2 = await mqtt.connectAsync(b.plainUrl, {
        ...b.server,
        clientId: `${SERVER_CLIENT_ID}-check`,
        protocolVersion: 5,
        reconnectPeriod: 0,
      });
      clients.push(s2);
      await s2.publishAsync(downTopic("robot-001", "task"), after, { qos: 1 });
    }
    await waitFor(() => got.includes(after), {
      timeoutMs: 10_000,
      intervalMs: 10,
      what: "robot-001's task sent after the attack",
    });
    return {
      serverCloses,
      serverDelivers,
      sessionPresent,
      queuedArrived: got.includes(queued),
      attackerConnacks,
    };
  } finally {
    for (const c of clients) c.end(true);
    await b.stop();
  }
}

/** The CONNACK's session-present flag of a connected mqtt.js client (its first CONNACK). */
const connacks = new WeakMap<MqttClient, { sessionPresent: boolean }>();
function sessionPresentOf(c: MqttClient): boolean {
  const p = connacks.get(c);
  if (!p) throw new Error("no CONNACK recorded for this client");
  return p.sessionPresent;
}

/** All four at once, so that a failure shows every victim. */
function assertNoTakeover(r: Awaited<ReturnType<typeof scenario>>) {
  assert.deepEqual(
    {
      serverCloses: r.serverCloses,
      serverDelivers: r.serverDelivers,
      robotSessionPresent: r.sessionPresent,
      queuedTaskArrived: r.queuedArrived,
    },
    { serverCloses: 0, serverDelivers: true, robotSessionPresent: true, queuedTaskArrived: true },
    "the fleet server was kicked or robot-001's session (and the task queued in it) was lost",
  );
}

Deno.test({
  name:
    "broker client ids: control, no attack: the server stays connected, robot-001's queued task arrives",
  ...opts,
  async fn() {
    const r = await scenario("none");
    assertNoTakeover(r);
  },
});

Deno.test({
  name:
    "broker client ids: robot-666's certificate cannot take over k8s4r-server's or robot-001's session",
  ...opts,
  async fn() {
    const r = await scenario("live robot");
    assert.deepEqual(r.attackerConnacks, [0, 0], "the attacker's CONNECTs were accepted");
    assertNoTakeover(r);
  },
});

Deno.test({
  name: "broker client ids: a removed (cut-off) robot-666 cannot take over them either",
  ...opts,
  async fn() {
    const r = await scenario("removed robot");
    assert.deepEqual(r.attackerConnacks, [0, 0], "the removed robot's CONNECTs were accepted");
    assertNoTakeover(r);
  },
});

Deno.test({
  name: "broker client ids: control, the rightful owner still takes over its own session",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const clients: MqttClient[] = [];
    try {
      const c1 = await b.issueCert("robot-001");
      const first = await robotSession(b, c1, "robot-001");
      clients.push(first);
      await first.subscribeAsync(robotSubscription("robot-001"), { qos: 1 });
      const reason = new Promise<number | undefined>((r) =>
        first.once("disconnect", (p) => r(p.reasonCode))
      );
      const closed = new Promise<void>((r) => first.once("close", () => r()));
      // A reconnect after a network drop: same certificate, same id, the old socket still open.
      const second = await robotSession(b, c1, "robot-001");
      clients.push(second);
      await closed;
      assert.equal(await reason, 0x8e, "DISCONNECT reason: session taken over");
      assert.equal(sessionPresentOf(second), true, "the new connection kept the session");
    } finally {
      for (const c of clients) c.end(true);
      await b.stop();
    }
  },
});
