/**
 * Review finding 11 (HIGH in HA mode): a robot that joins the fleet servers' shared subscription
 * makes the broker drop robots' messages. Mosquitto 2.0 grants any client's SUBSCRIBE and checks
 * `read` only on delivery; for a shared subscription it picks ONE member of the group per message,
 * and when that member is a robot (no read right on other robots' up topics) the message is
 * dropped, not given to another member: three robots in a public group `$share/k8s4r/...` left
 * the server 10 of 40 heartbeats.
 *
 * The fix: the group's name is a secret derived from the servers' broker password
 * (src/fleet/topics.ts `sharedGroup`), so a robot cannot name it. Here three robot certificates
 * subscribe to every name a robot could know or guess (the old public `k8s4r`, the topic tree's
 * root), robot-001 publishes 40 heartbeats at QoS 1, and the servers' side must get all 40. The
 * controls: two real servers in the group share all 40; and a robot that does know the name
 * (were the password to leak) still takes heartbeats away, so the test can see the harm.
 */
import assert from "node:assert/strict";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { SERVER_SUBSCRIPTION, sharedServerSubscription, upTopic } from "../src/fleet/topics.ts";
import { waitFor } from "../src/process/mod.ts";
import { startTestBroker, type TestBroker } from "./helpers/broker.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };
const HEARTBEATS = 40;

function serverMember(b: TestBroker, clientId: string, got: string[]): Promise<MqttClient> {
  return mqtt.connectAsync(b.plainUrl, {
    ...b.server,
    clientId,
    protocolVersion: 5,
    reconnectPeriod: 0,
  }).then(async (c) => {
    c.on("message", (t, p) => got.push(`${t} ${p}`));
    await c.subscribeAsync(sharedServerSubscription(b.server.password), { qos: 1 });
    return c;
  });
}

async function robotClient(b: TestBroker, id: string): Promise<MqttClient> {
  const cert = await b.issueCert(id);
  return await mqtt.connectAsync(b.tlsUrl, {
    key: cert.key,
    cert: cert.cert,
    ca: cert.ca,
    servername: "localhost",
    clientId: id,
    protocolVersion: 5,
    reconnectPeriod: 0,
  });
}

/** robot-001's heartbeats the servers' side received, with `attackers` robots in the group. */
/** What a robot could know or guess of the group's name. */
const GUESSES = ["k8s4r", "k8s4r-server", "k8s4r-replicas"].map((g) =>
  `$share/${g}/${SERVER_SUBSCRIPTION}`
);

async function run(
  attackers: string[],
  servers: string[],
  names: (b: TestBroker) => string[] = () => GUESSES,
): Promise<number> {
  const b = await startTestBroker();
  const clients: MqttClient[] = [];
  try {
    const got: string[] = [];
    for (const id of servers) clients.push(await serverMember(b, id, got));
    for (const id of attackers) {
      const a = await robotClient(b, id);
      clients.push(a);
      // Granted (Mosquitto's acl_file cannot refuse a SUBSCRIBE): it is in each group it names.
      for (const name of names(b)) {
        const [g] = await a.subscribeAsync(name, { qos: 1 });
        assert.ok(Number(g.qos) <= 2, `${id}'s SUBSCRIBE to ${name} was refused (${g.qos})`);
      }
    }
    const r1 = await robotClient(b, "robot-001");
    clients.push(r1);
    for (let seq = 1; seq <= HEARTBEATS; seq++) {
      await r1.publishAsync(upTopic("robot-001", "heartbeat"), `hb-${seq}`, { qos: 1 });
    }
    const mine = () => got.filter((m) => m.startsWith(upTopic("robot-001", "heartbeat"))).length;
    // Every publish was acknowledged by the broker; delivery to a live subscriber follows at
    // once. A dropped one never comes: wait for all of them, bounded.
    await waitFor(() => mine() >= HEARTBEATS, {
      timeoutMs: 10_000,
      intervalMs: 20,
      what: `${HEARTBEATS} heartbeats at the servers`,
    }).catch(() => {});
    return mine();
  } finally {
    for (const c of clients) c.end(true);
    await b.stop();
  }
}

Deno.test({
  name:
    "shared subscription, control: two fleet servers in the group get all 40 heartbeats between them",
  ...opts,
  async fn() {
    assert.equal(await run([], ["k8s4r-server-1", "k8s4r-server-2"]), HEARTBEATS);
  },
});

Deno.test({
  name:
    "shared subscription: robots that join every group they can name take no heartbeat away from the servers",
  ...opts,
  async fn() {
    const n = await run(["robot-666", "robot-667", "robot-668"], ["k8s4r-server-1"]);
    assert.equal(n, HEARTBEATS, `the server got ${n} of ${HEARTBEATS} heartbeats`);
  },
});

Deno.test({
  name:
    "shared subscription, control: a robot that knew the group's name would take heartbeats away (the harm the secret name keeps out)",
  ...opts,
  async fn() {
    const n = await run(
      ["robot-666", "robot-667", "robot-668"],
      ["k8s4r-server-1"],
      (b) => [sharedServerSubscription(b.server.password)],
    );
    assert.ok(n < HEARTBEATS, `the server got all ${n} heartbeats: the attack did no harm here`);
  },
});
