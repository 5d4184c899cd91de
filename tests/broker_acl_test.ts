/**
 * The robots' ACL on a REAL Mosquitto with the configuration k8s4r generates: a robot may publish
 * only the up kinds the protocol has (register, heartbeat, status, task) under its own id.
 *
 * A pattern `up/#` let a robot retain any number of messages under sub-topics it makes up
 * (200 × 200 KB were accepted): the broker keeps each and replays every one to the fleet server
 * on each subscribe. With one pattern per kind a robot can retain at most one message per kind.
 * Positive controls: each real kind is accepted, its retained status is replayed as before.
 */
import assert from "node:assert/strict";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { SERVER_SUBSCRIPTION, UP_KINDS, upTopic } from "../src/fleet/topics.ts";
import { waitFor } from "../src/process/mod.ts";
import { startTestBroker } from "./helpers/broker.ts";
import { pubackCode } from "./helpers/mqtt_codes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

Deno.test({
  name:
    "broker ACL: a robot publishes only its own up kinds; made-up sub-topics (retained or not) are refused",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    const clients: MqttClient[] = [];
    try {
      const c = await b.issueCert("robot-001");
      const r = await mqtt.connectAsync(b.tlsUrl, {
        key: c.key,
        cert: c.cert,
        ca: c.ca,
        servername: "localhost",
        clientId: "robot-001",
        protocolVersion: 5,
        reconnectPeriod: 0,
      });
      clients.push(r);
      const big = "x".repeat(200_000);
      const code = (topic: string, retain = false, payload = "{}") =>
        pubackCode(r, topic, payload, { retain });
      const refused = {
        junk: await code("k8s4r/robots/robot-001/up/junk/1", true, big),
        unknownKind: await code("k8s4r/robots/robot-001/up/x-anything", true),
        deeper: await code("k8s4r/robots/robot-001/up/status/extra", true),
        otherRobot: await code(upTopic("robot-002", "status"), true),
      };
      assert.deepEqual(refused, {
        junk: 0x87,
        unknownKind: 0x87,
        deeper: 0x87,
        otherRobot: 0x87,
      }, "a publish outside the robot's own up kinds was accepted");
      // The controls: every kind of the protocol is accepted; status retained, as the agent does.
      for (const kind of UP_KINDS) {
        assert.ok((await code(upTopic("robot-001", kind), kind === "status")) < 0x80, kind);
      }

      // What a (re)subscribing fleet server gets replayed: the one retained status, no junk.
      const server = await mqtt.connectAsync(b.plainUrl, {
        ...b.server,
        protocolVersion: 5,
        reconnectPeriod: 0,
      });
      clients.push(server);
      const got: string[] = [];
      server.on("message", (t) => got.push(t));
      await server.subscribeAsync([SERVER_SUBSCRIPTION, "k8s4r/test/marker"], { qos: 1 });
      await server.publishAsync("k8s4r/test/marker", "m", { qos: 1 });
      await waitFor(() => got.includes("k8s4r/test/marker"), {
        timeoutMs: 10_000,
        intervalMs: 10,
        what: "the server's marker",
      });
      assert.deepEqual(got.filter((t) => t !== "k8s4r/test/marker"), [
        upTopic("robot-001", "status"),
      ]);
    } finally {
      for (const c of clients) c.end(true);
      await b.stop();
    }
  },
});
