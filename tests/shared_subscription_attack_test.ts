/**
 * KNOWN FAILING (review finding 11, HIGH in HA mode): a robot can join the fleet servers' shared
 * subscription and make the broker drop robots' messages. Not fixed on this branch: the shared
 * subscription is being reworked on branch i13-replicas; this test is meant to be merged with
 * that fix (until then the attack case fails, honestly, and the control passes).
 *
 * With `--shared-subscription` (devenv --ha starts its servers so) the fleet servers subscribe
 * to `$share/k8s4r/k8s4r/robots/+/up/#` (src/fleet/topics.ts). Mosquitto 2.0 grants any
 * client's SUBSCRIBE and checks `read` only on delivery; for a shared subscription it picks ONE
 * member of the group per message, and when that member is a robot (no read right on other
 * robots' up topics) the message is dropped, not given to another member. So a robot that
 * subscribes to the same group takes its turns and throws them away (the review saw 10 of 40
 * reach the server). Here three robot certificates join the group (three: one session per
 * certificate, the client id being the CN), robot-001 publishes 40 heartbeats at QoS 1, and
 * the servers' side must get all 40.
 *
 * Fix options (for the lead and i13-replicas): a per-deployment secret group name in the
 * server's config (the reviewer's proposal: a robot cannot join a group it cannot name; the
 * name must be kept like a password, it is visible to nobody but the servers and the broker's
 * own persistence); or deny robots `$share/#` subscriptions (Mosquitto's acl_file cannot refuse
 * a SUBSCRIBE; the dynamic-security plugin can, with a default role for certificate clients
 * that denies `subscribePattern $share/#`, if every robot were a known client); or no shared
 * subscription (one active server and standbys).
 */
import assert from "node:assert/strict";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { SHARED_SERVER_SUBSCRIPTION, upTopic } from "../src/fleet/topics.ts";
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
    await c.subscribeAsync(SHARED_SERVER_SUBSCRIPTION, { qos: 1 });
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
async function run(attackers: string[], servers: string[]): Promise<number> {
  const b = await startTestBroker();
  const clients: MqttClient[] = [];
  try {
    const got: string[] = [];
    for (const id of servers) clients.push(await serverMember(b, id, got));
    for (const id of attackers) {
      const a = await robotClient(b, id);
      clients.push(a);
      // Granted (Mosquitto's acl_file cannot refuse a SUBSCRIBE): it is now in the group.
      const [g] = await a.subscribeAsync(SHARED_SERVER_SUBSCRIPTION, { qos: 1 });
      assert.ok(Number(g.qos) <= 2, `${id}'s SUBSCRIBE was refused (${g.qos})`);
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
    "shared subscription (KNOWN FAILING until i13-replicas): robots that join $share/k8s4r/... take no heartbeat away from the servers",
  ...opts,
  async fn() {
    const n = await run(["robot-666", "robot-667", "robot-668"], ["k8s4r-server-1"]);
    assert.equal(n, HEARTBEATS, `the server got ${n} of ${HEARTBEATS} heartbeats`);
  },
});
