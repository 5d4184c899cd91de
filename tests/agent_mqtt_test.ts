/**
 * The robot agent against a REAL Mosquitto (k8s4r's generated config: mTLS listener with ACL,
 * password listener for the server) on free loopback ports. A subscriber on the plain port plays
 * the fleet server and counts what arrives.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import mqttPacket from "mqtt-packet";
import { startTestBroker, TEST_TRUST_DOMAIN, type TestBroker } from "./helpers/broker.ts";
import { StaticX509Source } from "../src/spiffe/source.ts";
import { loadAgentConfig } from "../src/agent/config.ts";
import { RobotAgent } from "../src/agent/agent.ts";
import { waitFor } from "../src/process/mod.ts";
import { TcpProxy } from "./helpers/tcp_proxy.ts";
import { robotSvid } from "./helpers/agent_fleet.ts";
import { connectUpListener, writeAgentPlugins } from "./helpers/agent_rig.ts";
import {
  decodeUp,
  type HeartbeatMessage,
  type RegisterMessage,
  type StatusMessage,
  type UpMessage,
} from "../src/mqtt/messages.ts";

const ROBOT = "robot-001";
const opts = { sanitizeOps: false, sanitizeResources: false };

interface Harness {
  broker: TestBroker;
  dir: string;
  source: StaticX509Source;
  agent: RobotAgent;
  sub: MqttClient;
  got: UpMessage[];
  logs: string[];
  close(): Promise<void>;
}

/** Issued by the broker's CA (the SPIRE CA stand-in), with CN = robot id as SPIRE's -dns gives. */
const svidFor = (broker: TestBroker, ttlSeconds = 3600) => robotSvid(broker, ROBOT, ttlSeconds);

/** The fleet server's stand-in: every message must decode; `got` collects them. */
function subscriber(broker: TestBroker, got: UpMessage[]): Promise<MqttClient> {
  return connectUpListener(broker, ROBOT, "test-server", (m) => got.push(m), {
    clean: false, // keeps its queue across the broker restart (mosquitto persistence is on)
    properties: { sessionExpiryInterval: 600 },
  });
}

async function harness(
  brokerSpiffeId?: string,
  /** The port the agent dials instead of the broker's TLS port (a proxy in front of it). */
  via?: (broker: TestBroker) => number,
): Promise<Harness> {
  const broker = await startTestBroker();
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-agent-it-" });
  const logs: string[] = [];
  const got: UpMessage[] = [];
  let sub: MqttClient | undefined;
  let agent: RobotAgent | undefined;
  try {
    const first = svidFor(broker);
    const source = new StaticX509Source(first.svid, first.bundles);
    await writeAgentPlugins(dir, {
      spire: ["  manage: false"],
      mqtt: [
        `  brokerUrl: ssl://127.0.0.1:${via ? via(broker) : broker.tlsPort}`,
        "  heartbeatSeconds: 3600", // the test publishes heartbeats itself
        ...(brokerSpiffeId ? [`  brokerSpiffeId: ${brokerSpiffeId}`] : []),
      ],
      tasks: ['  allow: ["echo"]'],
    });
    const config = await loadAgentConfig({
      cwd: dir,
      env: { ROBOT_ID: ROBOT },
      flags: { config: "plugins.yaml" },
    });
    sub = await subscriber(broker, got);
    agent = new RobotAgent({
      config,
      source,
      cwd: dir,
      log: (event, fields) => logs.push(`${event} ${JSON.stringify(fields ?? {})}`),
      reconnectMinMs: 100,
      reconnectMaxMs: 1000,
    });
    const a = agent;
    const s = sub;
    return {
      broker,
      dir,
      source,
      agent,
      sub,
      got,
      logs,
      async close() {
        await a.stop().catch(() => {});
        await s.endAsync(true).catch(() => {});
        await broker.stop();
        await Deno.remove(dir, { recursive: true }).catch(() => {});
      },
    };
  } catch (err) {
    await agent?.stop().catch(() => {});
    await sub?.endAsync(true).catch(() => {});
    await broker.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    throw err;
  }
}

const heartbeats = (got: UpMessage[]) =>
  got.filter((m): m is HeartbeatMessage => m.type === "heartbeat").map((m) => m.seq);

function assertAllSeqs(got: UpMessage[], n: number) {
  const seen = new Set(heartbeats(got));
  const missing = [...Array(n).keys()].map((i) => i + 1).filter((s) => !seen.has(s)); // seq starts at 1
  assert.deepEqual(missing, [], `missing heartbeat seqs`);
}

Deno.test("agent connects over mTLS, registers, says online, heartbeats", opts, async () => {
  const h = await harness();
  try {
    h.agent.start();
    await waitFor(() => h.got.some((m) => m.type === "register"), {
      timeoutMs: 15_000,
      what: `register (logs: ${h.logs.join(" | ")})`,
    });
    const reg = h.got.find((m): m is RegisterMessage => m.type === "register")!;
    assert.equal(reg.robotId, ROBOT);
    assert.equal(reg.spiffeId, `spiffe://${TEST_TRUST_DOMAIN}/robot/${ROBOT}`);
    assert.equal(reg.device.hostname, Deno.hostname());
    await waitFor(() => h.got.some((m) => m.type === "status" && m.status === "online"), {
      timeoutMs: 10_000,
    });
    for (let i = 0; i < 5; i++) h.agent.heartbeat();
    await waitFor(() => heartbeats(h.got).length >= 5, { timeoutMs: 10_000 });
    assertAllSeqs(h.got, 5);
    assert.equal(h.agent.stats.connects, 1);
    // The session runs with mqtt.js `writeCache: false` (no 65,536-entry number cache), and
    // the real broker took its CONNECT, SUBSCRIBE and PUBLISHes (src/agent/mqtt_session_test.ts:
    // the bytes are the same as with the cache).
    assert.equal(mqttPacket.writeToStream.cacheNumbers, false);
  } finally {
    await h.close();
  }
  // A clean stop says offline (retained) before disconnecting, for the connection it ends:
  // (bootId, connection) of the register and online, so the server ranks it after them.
  const reg = h.got.find((m): m is RegisterMessage => m.type === "register")!;
  assert.equal(reg.bootId, h.agent.bootId);
  assert.equal(reg.connection, 1);
  const statuses = h.got.filter((m): m is StatusMessage => m.type === "status");
  const online = statuses.find((m) => m.status === "online")!;
  const offline = statuses.find((m) => m.status === "offline");
  assert.ok(offline, "offline on clean stop");
  assert.equal(offline.reason, "agent stopped");
  assert.deepEqual([online.bootId, online.connection], [h.agent.bootId, 1]);
  assert.deepEqual([offline.bootId, offline.connection], [h.agent.bootId, 1]);
});

Deno.test("rotation: new SVID -> reconnect with the new cert, zero QoS 1 loss", opts, async () => {
  const h = await harness();
  try {
    h.agent.start();
    await h.agent.session.whenConnected();
    const before = h.agent.session.connectionNotAfter!;
    for (let i = 0; i < 200; i++) h.agent.heartbeat(); // many in flight during the rotation
    const next = svidFor(h.broker, 7200); // expires an hour later than the first
    h.source.set(next.svid, next.bundles);
    for (let i = 0; i < 200; i++) h.agent.heartbeat(); // published while rotating
    await waitFor(() => h.agent.stats.connects >= 2 && h.agent.session.connected, {
      timeoutMs: 15_000,
      what: "the reconnect after rotation",
    });
    for (let i = 0; i < 100; i++) h.agent.heartbeat();
    await waitFor(() => new Set(heartbeats(h.got)).size >= 500, {
      timeoutMs: 20_000,
      what: `500 heartbeats (have ${new Set(heartbeats(h.got)).size})`,
    });
    assertAllSeqs(h.got, 500);
    const s = h.agent.stats;
    assert.equal(s.rotations, 1);
    assert.equal(s.rotationReconnects, 1);
    assert.equal(s.denied, 0);
    const after = h.agent.session.connectionNotAfter!;
    assert.equal(after.getTime(), next.svid.notAfter.getTime());
    assert.ok(after.getTime() > before.getTime());
    // A planned rotation sends DISCONNECT: the broker must not publish the will.
    assert.ok(!h.got.some((m) => m.type === "status" && m.status === "offline"));
    // Registered again on the new connection, with the new SVID's expiry. (At least twice: QoS 1
    // may deliver the first register again if its PUBACK was cut off by the rotation.)
    const registers = h.got.filter((m) => m.type === "register");
    assert.ok(registers.length >= 2, `${registers.length} registers`);
    const last = registers[registers.length - 1] as { svidExpiresAt?: string };
    assert.equal(Date.parse(last.svidExpiresAt ?? ""), next.svid.notAfter.getTime());
  } finally {
    await h.close();
  }
});

Deno.test("broker restart: heartbeats published during the outage all arrive", opts, async () => {
  const h = await harness();
  try {
    h.agent.start();
    await h.agent.session.whenConnected();
    for (let i = 0; i < 20; i++) h.agent.heartbeat();
    // The stand-in server's persistent session must be on disk before the crash, else what the
    // agent re-sends after the restart has no subscriber (that would be the test's loss, not the
    // agent's). Mosquitto autosaves every second: wait for a save newer than the subscription.
    const db = join(h.broker.files.persistenceDir, "mosquitto.db");
    const since = Date.now();
    await waitFor(async () => ((await Deno.stat(db)).mtime?.getTime() ?? 0) > since, {
      timeoutMs: 10_000,
      what: "a mosquitto autosave",
    });
    await h.broker.kill9(); // abrupt: in-flight messages are not acknowledged
    await waitFor(() => !h.agent.session.connected, { timeoutMs: 10_000, what: "disconnect" });
    for (let i = 0; i < 30; i++) h.agent.heartbeat(); // broker is down
    await h.broker.start();
    await waitFor(() => h.agent.session.connected, { timeoutMs: 20_000, what: "reconnect" });
    for (let i = 0; i < 10; i++) h.agent.heartbeat();
    await waitFor(() => new Set(heartbeats(h.got)).size >= 60, {
      timeoutMs: 20_000,
      what: "60 heartbeats",
    }).catch((err) => {
      throw new Error(
        `${err.message}: have ${JSON.stringify(heartbeats(h.got))}; agent ${
          JSON.stringify(h.agent.stats)
        }; logs ${h.logs.join(" | ")}`,
      );
    });
    assertAllSeqs(h.got, 60);
    assert.ok(h.agent.stats.buffered >= 30);
    assert.ok(h.agent.stats.reconnects >= 1);
  } finally {
    await h.close();
  }
});

Deno.test(
  "a broker with another SPIFFE ID is refused (no connection, clear error)",
  opts,
  async () => {
    const h = await harness(`spiffe://${TEST_TRUST_DOMAIN}/not-the-broker`);
    try {
      h.agent.start();
      await waitFor(
        () =>
          h.logs.some((l) => l.startsWith("mqtt.error") && /not-the-broker|mqtt-broker/.test(l)),
        {
          timeoutMs: 15_000,
          what: `an identity error (logs: ${h.logs.join(" | ")})`,
        },
      );
      assert.equal(h.agent.stats.connects, 0);
      assert.ok(!h.got.some((m) => m.type === "register"));
    } finally {
      await h.close();
    }
  },
);

// ---------------------------------------------------------------------------------------------
// The real command, with its SVID from a (fake) Workload API over a unix socket.

import { FakeWorkloadApi } from "../src/spiffe/testing/fake_workload_api.ts";
import { bufferIo } from "../src/cli/io.ts";
import { runCli } from "../src/cli/mod.ts";
import { rootCommand } from "../src/cli/commands.ts";
import { CliError } from "../src/cli/errors.ts";

Deno.test(
  "k8s4r agent: Workload API SVID, register, rotation pushed by the agent, clean exit",
  opts,
  async () => {
    const broker = await startTestBroker();
    const fake = await FakeWorkloadApi.start();
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-agent-cmd-" });
    const got: UpMessage[] = [];
    const sub = await subscriber(broker, got);
    const ac = new AbortController();
    try {
      const issue = (ttlSeconds: number) =>
        broker.ca.ca.issue({
          spiffeId: `spiffe://${TEST_TRUST_DOMAIN}/robot/${ROBOT}`,
          dnsNames: [ROBOT],
          ttlSeconds,
        });
      const first = issue(3600);
      fake.setX509Svids([first], { [TEST_TRUST_DOMAIN]: first.bundleDer });
      await Deno.writeTextFile(
        join(dir, "plugins.yaml"),
        `spire:\n  trustDomain: ${TEST_TRUST_DOMAIN}\n  dataDir: ${join(dir, "data")}\n`,
      );
      const io = bufferIo({ cwd: dir, env: {}, signal: ac.signal });
      const run = runCli(rootCommand, [
        "agent",
        "--robot-id",
        ROBOT,
        "--config",
        "plugins.yaml",
        "--socket",
        fake.socketPath,
        "--no-manage-spire",
        "--broker-url",
        `tls://127.0.0.1:${broker.tlsPort}`,
        "--heartbeat-seconds",
        "1",
      ], io);
      await waitFor(() => got.some((m) => m.type === "register"), {
        timeoutMs: 20_000,
        what: "register",
      }).catch((e) => {
        throw new Error(`${e.message}; agent log:\n${io.err()}`);
      });
      // Rotation pushed by the Workload API: the agent reconnects and registers again.
      const second = issue(7200);
      fake.setX509Svids([second], { [TEST_TRUST_DOMAIN]: second.bundleDer });
      await waitFor(() => got.filter((m) => m.type === "register").length >= 2, {
        timeoutMs: 20_000,
        what: "register after rotation",
      }).catch((e) => {
        throw new Error(`${e.message}; agent log:\n${io.err()}`);
      });
      const regs = got.filter((m): m is RegisterMessage => m.type === "register");
      assert.equal(regs[1].svidExpiresAt, second.certificate.validToDate.toISOString());
      await waitFor(() => heartbeats(got).length >= 1, { timeoutMs: 10_000, what: "heartbeat" });
      ac.abort();
      assert.equal(await run, 0);
      const log = io.err();
      assert.match(log, /mqtt\.connected/);
      assert.match(log, /mqtt\.rotating_connection/);
      assert.match(log, /agent\.stopped/);
      assert.equal(io.out(), "");
      await waitFor(() => got.some((m) => m.type === "status" && m.status === "offline"), {
        timeoutMs: 10_000,
        what: "offline status",
      });
    } finally {
      ac.abort();
      await sub.endAsync(true).catch(() => {});
      await fake.close();
      await broker.stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
);

Deno.test(
  "k8s4r agent: an SVID with another SPIFFE ID is a clear error, no MQTT",
  opts,
  async () => {
    const fake = await FakeWorkloadApi.start();
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-agent-cmd-" });
    try {
      const broker = {
        ca: (await import("../src/spiffe/testing/test_ca.ts")).TestCa.create({
          trustDomain: TEST_TRUST_DOMAIN,
        }),
      };
      const other = broker.ca.issue({
        spiffeId: `spiffe://${TEST_TRUST_DOMAIN}/robot/robot-999`,
        dnsNames: ["robot-999"],
      });
      fake.setX509Svids([other], { [TEST_TRUST_DOMAIN]: other.bundleDer });
      await Deno.writeTextFile(
        join(dir, "plugins.yaml"),
        `spire:\n  trustDomain: ${TEST_TRUST_DOMAIN}\n`,
      );
      const io = bufferIo({ cwd: dir, env: { ROBOT_ID: ROBOT } });
      const timeoutFlagFree = runCli(rootCommand, [
        "agent",
        "--config",
        "plugins.yaml",
        "--socket",
        fake.socketPath,
        "--no-manage-spire",
        "--broker-url",
        "ssl://127.0.0.1:1",
      ], io);
      await assert.rejects(timeoutFlagFree, (e: Error) => {
        assert.ok(e instanceof CliError);
        assert.match(
          e.message,
          new RegExp(
            `^no SVID for spiffe://${TEST_TRUST_DOMAIN}/robot/${ROBOT} from the SPIRE agent at`,
          ),
        );
        return true;
      });
      assert.doesNotMatch(io.err(), /mqtt\.connected/);
    } finally {
      await fake.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
);

Deno.test(
  "half-open connection: the agent's new connection takes over its own session (client id = CN); the old will comes before it, no heartbeat lost, online retained",
  opts,
  async () => {
    let proxy: TcpProxy | undefined;
    const h = await harness(undefined, (b) => {
      proxy = TcpProxy.start({ hostname: "127.0.0.1", port: b.tlsPort });
      return proxy.port;
    });
    const p = proxy!;
    try {
      h.agent.start();
      const isStatus = (m: UpMessage, s: "online" | "offline", c: number) =>
        m.type === "status" && m.status === s && m.connection === c;
      await waitFor(() => h.got.some((m) => isStatus(m, "online", 1)), {
        timeoutMs: 15_000,
        what: `online of connection 1 (logs: ${h.logs.join(" | ")})`,
      });
      for (let i = 0; i < 50; i++) h.agent.heartbeat();
      await waitFor(() => new Set(heartbeats(h.got)).size >= 50, { timeoutMs: 10_000 });
      // The agent's side of the connection ends; the broker still holds it (no FIN reaches it).
      p.severClients();
      for (let i = 0; i < 50; i++) h.agent.heartbeat(); // published while it reconnects
      await waitFor(() => h.agent.stats.connects >= 2 && h.agent.session.connected, {
        timeoutMs: 15_000,
        what: "the agent's reconnect",
      });
      // Control: this was a takeover: the broker ended the old connection at the new CONNECT
      // (its keepalive, 1.5 x 30 s, is far off), not because it timed out.
      await waitFor(() => p.orphansClosedByServer >= 1, {
        timeoutMs: 10_000,
        what: "the broker to end the half-open connection (session takeover)",
      });
      assert.equal(p.accepted, 2);
      for (let i = 0; i < 50; i++) h.agent.heartbeat();
      await waitFor(() => new Set(heartbeats(h.got)).size >= 150, {
        timeoutMs: 20_000,
        what: `150 heartbeats (have ${new Set(heartbeats(h.got)).size})`,
      });
      assertAllSeqs(h.got, 150);
      // Mosquitto publishes the taken-over connection's will, before anything of the new one:
      // the server sees connection 1 go offline, then connection 2 register and go online.
      const will = h.got.findIndex((m) => isStatus(m, "offline", 1));
      const reg2 = h.got.findIndex((m) => m.type === "register" && m.connection === 2);
      const online2 = h.got.findIndex((m) => isStatus(m, "online", 2));
      assert.ok(reg2 >= 0 && online2 >= 0, "connection 2 registered and went online");
      assert.ok(will >= 0, "Mosquitto 2.0.21 publishes the taken-over connection's will");
      assert.ok(
        will < reg2 && will < online2,
        "the old will came after the new connection's messages",
      );
      assert.ok(
        !h.got.some((m) => m.type === "status" && m.status === "offline" && m.connection !== 1),
        "a will of the live connection was published",
      );
      // What a server subscribing now is told: connection 2 is online.
      const late: UpMessage[] = [];
      const peek = await mqtt.connectAsync(h.broker.plainUrl, {
        username: h.broker.server.username,
        password: h.broker.server.password,
        clientId: `peek-${crypto.randomUUID().slice(0, 8)}`,
        protocolVersion: 5,
        reconnectPeriod: 0,
      });
      try {
        peek.on("message", (topic, payload) => {
          const d = decodeUp(topic, new Uint8Array(payload));
          if (d.ok) late.push(d.message);
        });
        await peek.subscribeAsync(`k8s4r/robots/${ROBOT}/up/status`, { qos: 1 });
        await waitFor(() => late.length >= 1, { timeoutMs: 10_000, what: "the retained status" });
      } finally {
        await peek.endAsync(true);
      }
      assert.ok(isStatus(late[0], "online", 2), `retained: ${JSON.stringify(late[0])}`);
    } finally {
      await h.close();
      p.close();
    }
  },
);
