/**
 * The broker's limits (src/mqtt/broker_config.ts) against a REAL Mosquitto: a robot flooding
 * while the fleet server is offline fills the server's persistent session only up to
 * `max_queued_bytes`; a packet above the protocol's 256 KiB payload cuts the connection.
 *
 * Positive controls: the same flood against a broker whose byte limit is far above it arrives
 * whole; a payload of exactly 256 KiB arrives.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { startTestBroker, type TestBroker } from "./helpers/broker.ts";
import { waitFor } from "../src/process/mod.ts";
import { upTopic } from "../src/fleet/topics.ts";
import { MAX_PAYLOAD_BYTES } from "../src/mqtt/messages.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };
const SERVER_SUB = "k8s4r/robots/+/up/#";

async function robot(b: TestBroker, id: string): Promise<MqttClient> {
  const c = await b.issueCert(id);
  return await mqtt.connectAsync(b.tlsUrl, {
    key: c.key,
    cert: c.cert,
    ca: c.ca,
    servername: "localhost",
    clientId: `${id}-${crypto.randomUUID().slice(0, 6)}`,
    protocolVersion: 5,
    reconnectPeriod: 0,
    connectTimeout: 5000,
  });
}

/** The fleet server's persistent session (clean: false, MQTT 5 session expiry). */
async function serverSession(b: TestBroker, clientId: string) {
  const got: { topic: string; bytes: number }[] = [];
  const client = mqtt.connect(b.plainUrl, {
    username: b.server.username,
    password: b.server.password,
    clientId,
    clean: false,
    protocolVersion: 5,
    properties: { sessionExpiryInterval: 600 },
    reconnectPeriod: 0,
  });
  // Before CONNACK: a resumed session's queued messages follow it at once.
  client.on("message", (topic, payload) => got.push({ topic, bytes: payload.byteLength }));
  await new Promise<void>((resolve, reject) => {
    client.once("connect", () => resolve());
    client.once("error", reject);
  });
  return { client, got };
}

/**
 * Floods `count` messages of `size` bytes from robot-001 while the server's session is offline,
 * then reconnects the server and returns what its session had kept (up to a sync message the
 * robot sends once the server is back: everything queued before it has been delivered then).
 */
async function floodWhileServerAway(b: TestBroker, count: number, size: number) {
  const id = `k8s4r-server-${crypto.randomUUID().slice(0, 6)}`;
  const first = await serverSession(b, id);
  await first.client.subscribeAsync(SERVER_SUB, { qos: 1 });
  await first.client.endAsync(); // a normal DISCONNECT: the session (and its queue) stays
  const r = await robot(b, "robot-001");
  try {
    const payload = Buffer.alloc(size, 0x61);
    for (let i = 0; i < count; i++) {
      // Every one is accepted by the broker (PUBACK); what the offline session keeps is bounded.
      await r.publishAsync(upTopic("robot-001", "heartbeat"), payload, { qos: 1 });
    }
    const back = await serverSession(b, id);
    try {
      await r.publishAsync(upTopic("robot-001", "register"), Buffer.from("sync"), { qos: 1 });
      await waitFor(() => back.got.some((m) => m.topic.endsWith("/up/register")), {
        timeoutMs: 30_000,
        what: "the sync message after the queued ones",
      });
      const flood = back.got.filter((m) => m.topic.endsWith("/up/heartbeat"));
      return { messages: flood.length, bytes: flood.reduce((n, m) => n + m.bytes, 0) };
    } finally {
      await back.client.endAsync(true);
    }
  } finally {
    await r.endAsync(true);
  }
}

Deno.test(
  "broker: a flooding robot fills the offline server's session only up to max_queued_bytes",
  opts,
  async () => {
    const LIMIT = 1024 * 1024;
    const SIZE = 8 * 1024;
    const COUNT = 400; // 3.2 MiB
    const limited = await startTestBroker({ maxQueuedBytes: LIMIT });
    let bounded;
    try {
      bounded = await floodWhileServerAway(limited, COUNT, SIZE);
    } finally {
      await limited.stop();
    }
    console.log(
      `flood of ${COUNT} x ${SIZE} B = ${
        COUNT * SIZE
      } B; the server's session kept ${bounded.messages} messages, ${bounded.bytes} B (max_queued_bytes ${LIMIT})`,
    );
    // Mosquitto queues while the total is below the limit: never more than one message above it
    // (in our runs a few messages below it: the limit is checked against its own accounting).
    // ... and the queue did fill (most of the limit), so it is the byte limit that stopped it.
    assert.ok(bounded.bytes > LIMIT * 0.9, `kept only ${bounded.bytes} B of ${LIMIT}`);
    assert.ok(
      bounded.bytes < LIMIT + SIZE,
      `kept ${bounded.bytes} B, above ${LIMIT} + one message`,
    );

    // Control: the same flood with the byte limit far above it arrives whole.
    const roomy = await startTestBroker({ maxQueuedBytes: 64 * LIMIT });
    try {
      const all = await floodWhileServerAway(roomy, COUNT, SIZE);
      assert.equal(all.messages, COUNT);
      assert.equal(all.bytes, COUNT * SIZE);
    } finally {
      await roomy.stop();
    }
  },
);

Deno.test(
  "broker: a packet above 256 KiB of payload cuts the connection (max_packet_size); nothing arrives",
  opts,
  async () => {
    const b = await startTestBroker();
    const srv = await serverSession(b, `k8s4r-server-${crypto.randomUUID().slice(0, 6)}`);
    const r = await robot(b, "robot-001");
    try {
      await srv.client.subscribeAsync(SERVER_SUB, { qos: 1 });
      const topic = upTopic("robot-001", "task");
      // Control: exactly the protocol's limit arrives.
      await r.publishAsync(topic, Buffer.alloc(MAX_PAYLOAD_BYTES, 0x62), { qos: 1 });
      await waitFor(() => srv.got.some((m) => m.bytes === MAX_PAYLOAD_BYTES), {
        timeoutMs: 10_000,
        what: "the 256 KiB payload",
      });
      // Above max_packet_size: the broker disconnects the robot (DISCONNECT 0x95; mqtt.js may
      // see the reset before it parses that packet, so the close is what is waited for).
      let reason: number | undefined;
      let closed = false;
      r.on("disconnect", (p) => (reason = p.reasonCode));
      r.on("close", () => (closed = true));
      r.on("error", () => {}); // ECONNRESET after the DISCONNECT
      const big = r.publishAsync(topic, Buffer.alloc(MAX_PAYLOAD_BYTES + 8192, 0x64), { qos: 1 });
      big.catch(() => {}); // never acknowledged: the connection is gone
      await waitFor(() => closed, { timeoutMs: 10_000, what: "the broker to cut the connection" });
      assert.ok(reason === undefined || reason === 0x95, `DISCONNECT reason ${reason}`);
      const again = await robot(b, "robot-001");
      await again.publishAsync(upTopic("robot-001", "register"), Buffer.from("sync"), { qos: 1 });
      await waitFor(() => srv.got.some((m) => m.topic.endsWith("/up/register")), {
        timeoutMs: 10_000,
        what: "the sync message",
      });
      await again.endAsync(true);
      assert.deepEqual(srv.got.filter((m) => m.topic === topic).map((m) => m.bytes), [
        MAX_PAYLOAD_BYTES,
      ]);
    } finally {
      await r.endAsync(true).catch(() => {});
      await srv.client.endAsync(true);
      await b.stop();
    }
  },
);

Deno.test(
  "broker: why k8s4r does not write message_size_limit (2.0.x PUBACK 0x95 breaks mqtt.js)",
  opts,
  async () => {
    const b = await startTestBroker({ extraConfig: [`message_size_limit ${MAX_PAYLOAD_BYTES}`] });
    const r = await robot(b, "robot-001");
    try {
      const errors: string[] = [];
      r.on("error", (e) => errors.push(e.message));
      const p = r.publishAsync(upTopic("robot-001", "task"), Buffer.alloc(MAX_PAYLOAD_BYTES + 1), {
        qos: 1,
      });
      p.catch(() => {});
      // The broker answers PUBACK 0x95 ("packet too large"), which MQTT 5 does not allow in a
      // PUBACK: mqtt.js refuses the packet, the publish is never answered.
      await waitFor(() => errors.some((e) => /Invalid puback reason code/.test(e)), {
        timeoutMs: 10_000,
        what: `mqtt.js to refuse the PUBACK (errors: ${errors.join("; ")})`,
      });
    } finally {
      await r.endAsync(true).catch(() => {});
      await b.stop();
    }
  },
);
