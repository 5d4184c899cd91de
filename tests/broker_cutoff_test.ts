/**
 * Cutting a robot off a REAL Mosquitto with a certificate it still holds (src/mqtt/dynsec.ts), on
 * whatever 2.0.x is installed: what `k8s4r robot remove` does on the broker, and exactly what a
 * removed robot whose certificate has not expired can still do afterwards.
 *
 * - its live session is disconnected at once (MQTT 5 DISCONNECT 0x98), without its will;
 * - it can still complete TLS and CONNECT (CONNACK 0: Mosquitto does not authenticate
 *   certificate clients through the plugin), but every PUBLISH is refused (PUBACK 0x87), every
 *   SUBSCRIBE too (SUBACK 0x87), and its will is not published;
 * - the cut-off survives a broker restart, and lifting it (robot added again) restores access.
 *
 * Positive control throughout: robot-002, not removed, does each of these successfully.
 */
import assert from "node:assert/strict";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { downTopic, upTopic } from "../src/fleet/topics.ts";
import {
  cutOffUsername,
  DynsecAdmin,
  removedUsernames,
  restoreUsername,
} from "../src/mqtt/dynsec.ts";
import { waitFor } from "../src/process/mod.ts";
import { type PemCert, startTestBroker, type TestBroker } from "./helpers/broker.ts";
import { pubackCode, subackCode } from "./helpers/mqtt_codes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

function connect(b: TestBroker, id: string, cert: PemCert): Promise<MqttClient> {
  return mqtt.connectAsync(b.tlsUrl, {
    key: cert.key,
    cert: cert.cert,
    ca: cert.ca,
    servername: "localhost",
    clientId: `${id}-${crypto.randomUUID().slice(0, 6)}`,
    protocolVersion: 5,
    reconnectPeriod: 0,
    connectTimeout: 5000,
    will: {
      topic: upTopic(id, "status"),
      payload: Buffer.from(JSON.stringify({ will: id })),
      qos: 1,
      retain: false,
    },
  });
}

/** Ends with DISCONNECT 0x04 "disconnect with will", and waits for the broker to close. */
async function disconnectWithWill(c: MqttClient): Promise<void> {
  const closed = new Promise<void>((r) => c.once("close", () => r()));
  c.end(false, { reasonCode: 0x04 });
  await closed;
}

Deno.test({
  name:
    "broker cut-off: a removed robot is disconnected at once; reconnected, every publish and subscribe is refused; the other robot is unaffected",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const clients: MqttClient[] = [];
    const admin = () => DynsecAdmin.connect({ port: b.plainPort, ...b.admin });
    try {
      const [c1, c2] = [await b.issueCert("robot-001"), await b.issueCert("robot-002")];
      const server = await mqtt.connectAsync(b.plainUrl, {
        ...b.server,
        protocolVersion: 5,
        reconnectPeriod: 0,
      });
      clients.push(server);
      const atServer: string[] = [];
      server.on("message", (t, p) => atServer.push(`${t} ${p}`));
      await server.subscribeAsync(["k8s4r/robots/+/up/#", "k8s4r/test/marker"], { qos: 1 });
      const marker = async () => {
        const m = `marker-${crypto.randomUUID().slice(0, 8)}`;
        await server.publishAsync("k8s4r/test/marker", m, { qos: 1 });
        await waitFor(() => atServer.some((x) => x.endsWith(m)), {
          timeoutMs: 10_000,
          intervalMs: 20,
          what: "the server's own marker",
        });
        return atServer.findIndex((x) => x.endsWith(m));
      };

      // Both robots work.
      const r1 = await connect(b, "robot-001", c1);
      const r2 = await connect(b, "robot-002", c2);
      clients.push(r1, r2);
      assert.ok((await pubackCode(r1, upTopic("robot-001", "heartbeat"))) < 0x80);
      assert.ok((await pubackCode(r2, upTopic("robot-002", "heartbeat"))) < 0x80);

      // The cut-off: robot-001's live session is closed by the broker, with reason 0x98.
      const reason = new Promise<number | undefined>((resolve) =>
        r1.once("disconnect", (p) => resolve(p.reasonCode))
      );
      const closed = new Promise<number>((resolve) => r1.once("close", () => resolve(Date.now())));
      const a = await admin();
      const t0 = Date.now();
      try {
        await cutOffUsername(a, "robot-001");
        assert.deepEqual(await removedUsernames(a), ["robot-001"]);
        await cutOffUsername(a, "robot-001"); // idempotent
      } finally {
        await a.close();
      }
      await waitFor(async () => (await Promise.race([closed, Promise.resolve(0)])) > 0, {
        timeoutMs: 5000,
        intervalMs: 10,
        what: "robot-001 disconnected within 5 s",
      });
      console.log(`  robot-001 disconnected ${(await closed) - t0} ms after the cut-off began`);
      assert.equal(await reason, 0x98, "DISCONNECT reason: administrative action");
      assert.equal(r2.connected, true, "robot-002 stayed connected");

      // Reconnecting with the same, still valid certificate: CONNECT succeeds...
      const again = await connect(b, "robot-001", c1);
      clients.push(again);
      assert.equal(again.connected, true);
      // ...but nothing else does.
      assert.equal(await pubackCode(again, upTopic("robot-001", "heartbeat")), 0x87);
      assert.equal(await pubackCode(again, upTopic("robot-001", "register")), 0x87);
      assert.equal(await subackCode(again, downTopic("robot-001", "task")), 0x87, "SUBACK");
      // The control: robot-002 still publishes and subscribes.
      assert.ok((await pubackCode(r2, upTopic("robot-002", "heartbeat"))) < 0x80);
      assert.equal(await subackCode(r2, downTopic("robot-002", "task")), 1);

      // Its will is not published either; robot-002's is (each checked against a marker the
      // server sends after the broker closed that connection: delivery to one session is in order).
      const before = atServer.length;
      await disconnectWithWill(again);
      const m1 = await marker();
      assert.deepEqual(
        atServer.slice(before, m1).filter((x) => x.includes('"will":"robot-001"')),
        [],
        "robot-001's will reached the server",
      );
      const before2 = atServer.length;
      await disconnectWithWill(r2);
      const m2 = await marker();
      assert.equal(
        atServer.slice(before2, m2).filter((x) => x.includes('"will":"robot-002"')).length,
        1,
        "the control: robot-002's will reached the server",
      );
      assert.equal(
        atServer.filter((x) => x.startsWith(upTopic("robot-001", "heartbeat"))).length,
        1,
        "only robot-001's heartbeat from before the cut-off arrived",
      );

      // The deny list is the plugin's saved state: a broker restart keeps it.
      await b.restart();
      const afterRestart = await connect(b, "robot-001", c1);
      clients.push(afterRestart);
      assert.equal(await pubackCode(afterRestart, upTopic("robot-001", "heartbeat")), 0x87);

      // Lifted (the robot was added again): its next session works; the lift disconnects the
      // denied session at once too.
      const kicked = new Promise<void>((r) => afterRestart.once("close", () => r()));
      const a2 = await admin();
      try {
        assert.equal(await restoreUsername(a2, "robot-001"), true);
        assert.equal(await restoreUsername(a2, "robot-001"), false);
        assert.deepEqual(await removedUsernames(a2), []);
      } finally {
        await a2.close();
      }
      await kicked;
      const back = await connect(b, "robot-001", c1);
      clients.push(back);
      assert.ok((await pubackCode(back, upTopic("robot-001", "heartbeat"))) < 0x80);
    } finally {
      for (const c of clients) c.end(true);
      await b.stop();
    }
  },
});

Deno.test({
  name: "broker cut-off: the admin login reaches only the plugin's topics; robots cannot reach it",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const clients: MqttClient[] = [];
    try {
      const adm = await mqtt.connectAsync(b.plainUrl, {
        ...b.admin,
        protocolVersion: 5,
        reconnectPeriod: 0,
      });
      clients.push(adm);
      assert.equal(await pubackCode(adm, upTopic("robot-001", "status")), 0x87);
      assert.equal(await pubackCode(adm, downTopic("robot-001", "task")), 0x87);
      // A robot certificate cannot send plugin commands.
      const r = await connect(b, "robot-003", await b.issueCert("robot-003"));
      clients.push(r);
      assert.equal(await pubackCode(r, "$CONTROL/dynamic-security/v1"), 0x87);
      // The control: the admin can.
      const a = await DynsecAdmin.connect({ port: b.plainPort, ...b.admin });
      try {
        assert.deepEqual(await removedUsernames(a), []);
      } finally {
        await a.close();
      }
      // A wrong admin password is refused.
      await assert.rejects(
        () => DynsecAdmin.connect({ port: b.plainPort, ...b.admin, password: "nope" }),
        /admin login .* failed/,
      );
    } finally {
      for (const c of clients) c.end(true);
      await b.stop();
    }
  },
});
