/**
 * `writeCache: false` (mqtt_session.ts) changes how mqtt-packet gets the two-byte numbers it
 * writes (a fresh 2-byte Buffer instead of one of 65,536 cached ones), not what it writes. These
 * tests hold the bytes of every packet the agent sends equal with the cache on and off, for
 * every 16-bit value where a number is written; tests/agent_mqtt_test.ts runs the session (the
 * option on) against a real Mosquitto, which accepts them.
 *
 * mqtt-packet is mqtt.js's own dependency (same version, so the same module instance): the
 * switch is its process-wide `writeToStream.cacheNumbers`, which mqtt.js sets to false when a
 * client is made with `writeCache: false` (build/lib/client.js, the only place mqtt.js reads the
 * option).
 */
import assert from "node:assert/strict";
import mqttPacket from "mqtt-packet";
import { MqttClient } from "mqtt";
import { Duplex } from "node:stream";

type Packet = Parameters<typeof mqttPacket.writeToStream>[0];

/** The bytes `writeToStream` writes for a packet (copies: cached buffers are shared). */
function bytes(packet: Packet): Uint8Array {
  const chunks: Uint8Array[] = [];
  const sink = {
    write(b: Uint8Array) {
      chunks.push(Uint8Array.from(b));
      return true;
    },
  };
  // deno-lint-ignore no-explicit-any
  mqttPacket.writeToStream(packet, sink as any, { protocolVersion: 5 });
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let o = 0;
  for (const c of chunks) {
    out.set(c, o);
    o += c.length;
  }
  return out;
}

/**
 * Writes every packet with the cache on, then every one with it off, and compares. (The switch
 * is flipped once per pass: turning the cache on counts the cache's keys each time.)
 */
function assertSameWithAndWithoutCache(packets: { what: string; packet: Packet }[]) {
  mqttPacket.writeToStream.cacheNumbers = true;
  const cached = packets.map((p) => bytes(p.packet));
  mqttPacket.writeToStream.cacheNumbers = false;
  const generated = packets.map((p) => bytes(p.packet));
  packets.forEach((p, i) => {
    assert.ok(cached[i].length > 0, `${p.what}: nothing written`);
    assert.deepEqual(generated[i], cached[i], p.what);
  });
}

const saved = mqttPacket.writeToStream.cacheNumbers;
const restore = () => (mqttPacket.writeToStream.cacheNumbers = saved);

Deno.test("mqtt-packet: PUBLISH, PUBACK and SUBSCRIBE bytes equal with and without the number cache, every packet id", () => {
  try {
    const payload = new TextEncoder().encode('{"v":1,"type":"heartbeat","seq":1}');
    const packets: { what: string; packet: Packet }[] = [];
    const add = (what: string, packet: Packet) => packets.push({ what, packet });
    for (let id = 1; id <= 0xffff; id++) {
      add(`publish id ${id}`, {
        cmd: "publish",
        topic: "k8s4r/robots/robot-001/up/heartbeat",
        payload,
        qos: 1,
        retain: id % 2 === 0,
        dup: false,
        messageId: id,
        properties: {},
      } as Packet);
      add(`puback id ${id}`, { cmd: "puback", messageId: id, reasonCode: 0 } as Packet);
    }
    for (const id of [1, 0xff, 0x100, 0x1234, 0xff00, 0xffff]) {
      add(`subscribe id ${id}`, {
        cmd: "subscribe",
        messageId: id,
        subscriptions: [{ topic: "k8s4r/robots/robot-001/down/#", qos: 1 }],
        properties: {},
      } as Packet);
    }
    assertSameWithAndWithoutCache(packets);
  } finally {
    restore();
  }
});

Deno.test("mqtt-packet: CONNECT (will, session expiry), PINGREQ, DISCONNECT equal with and without the cache, every keepalive and string length", () => {
  try {
    const connect = (keepalive: number, clientId: string, willTopic: string, will: Uint8Array) =>
      ({
        cmd: "connect",
        protocolId: "MQTT",
        protocolVersion: 5,
        clean: false,
        clientId,
        keepalive,
        properties: { sessionExpiryInterval: 86_400 },
        will: { topic: willTopic, payload: will, qos: 1, retain: true, properties: {} },
      }) as Packet;
    const will = new TextEncoder().encode('{"type":"status","status":"offline"}');
    const packets: { what: string; packet: Packet }[] = [];
    for (let k = 0; k <= 0xffff; k++) {
      packets.push({
        what: `connect keepalive ${k}`,
        packet: connect(k, "robot-001", "t/w", will),
      });
    }
    // Lengths of strings and binary fields are two-byte numbers too: topic, client id, payload.
    for (const n of [0, 1, 127, 128, 255, 256, 1000, 4096, 0x7fff, 0xffff]) {
      packets.push({
        what: `connect lengths ${n}`,
        packet: connect(
          30,
          "c".repeat(Math.min(n, 23) || 1),
          "t".repeat(n || 1),
          new Uint8Array(n),
        ),
      });
    }
    packets.push({ what: "pingreq", packet: { cmd: "pingreq" } as Packet });
    packets.push({ what: "disconnect", packet: { cmd: "disconnect", reasonCode: 0 } as Packet });
    assertSameWithAndWithoutCache(packets);
  } finally {
    restore();
  }
});

Deno.test("mqtt.js: a client made with writeCache false turns mqtt-packet's number cache off (same module)", () => {
  try {
    mqttPacket.writeToStream.cacheNumbers = true;
    // A stream that never connects: the constructor alone applies the option.
    const idle = () =>
      new Duplex({
        read() {},
        write(_c, _e, cb) {
          cb();
        },
      });
    const withCache = new MqttClient(idle, { writeCache: true, reconnectPeriod: 0 });
    withCache.end(true);
    assert.equal(mqttPacket.writeToStream.cacheNumbers, true, "writeCache: true keeps the cache");
    const without = new MqttClient(idle, { writeCache: false, reconnectPeriod: 0 });
    without.end(true);
    assert.equal(mqttPacket.writeToStream.cacheNumbers, false, "writeCache: false turns it off");
  } finally {
    restore();
  }
});
