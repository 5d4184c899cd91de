/**
 * Real robot agents (`RobotAgent`, SVIDs from a `StaticX509Source` the test rotates) against a
 * REAL Mosquitto (tests/helpers/broker.ts), and a stand-in for the fleet server on the password
 * listener that records every robot's up/ messages in arrival order.
 */
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { BrokerDied, startTestBroker, TEST_TRUST_DOMAIN, type TestBroker } from "./broker.ts";

export { BrokerDied };
import { StaticX509Source } from "../../src/spiffe/source.ts";
import { parseX509SvidPem } from "../../src/spiffe/svid.ts";
import { X509Bundle, X509BundleSet } from "../../src/spiffe/bundle.ts";
import { loadAgentConfig } from "../../src/agent/config.ts";
import { RobotAgent } from "../../src/agent/agent.ts";
import { waitFor } from "../../src/process/mod.ts";
import { writeAgentPlugins } from "./agent_rig.ts";
import {
  decodeUp,
  type HeartbeatMessage,
  type StatusMessage,
  type UpMessage,
} from "../../src/mqtt/messages.ts";

export interface Robot {
  id: string;
  dir: string;
  source: StaticX509Source;
  agent: RobotAgent;
  /** `<iso time> <event> <json fields>`, across restarts of the robot. */
  logs: string[];
}

/** An SVID of `id` from the broker's test CA (the SPIRE CA stand-in), CN = robot id. */
export function robotSvid(broker: TestBroker, id: string, ttlSeconds = 3600) {
  const c = broker.ca.ca.issue({
    spiffeId: `spiffe://${TEST_TRUST_DOMAIN}/robot/${id}`,
    dnsNames: [id],
    ttlSeconds,
  });
  return {
    svid: parseX509SvidPem(c.chainPem, c.keyPem),
    bundles: new X509BundleSet([X509Bundle.fromPem(TEST_TRUST_DOMAIN, c.bundlePem)]),
  };
}

export interface FleetOptions {
  /** `mqtt.sessionExpirySeconds` of every robot (default: the agent's default). */
  sessionExpiry?: number;
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
}

export class AgentFleet {
  readonly robots = new Map<string, Robot>();
  readonly got: UpMessage[] = [];
  sub?: MqttClient;
  private constructor(readonly broker: TestBroker, readonly o: FleetOptions) {}

  static async create(o: FleetOptions = {}): Promise<AgentFleet> {
    const f = new AgentFleet(await startTestBroker(), o);
    try {
      const sub = mqtt.connect(f.broker.plainUrl, {
        username: f.broker.server.username,
        password: f.broker.server.password,
        clientId: `test-server-${crypto.randomUUID().slice(0, 8)}`,
        protocolVersion: 5,
        reconnectPeriod: 100,
      });
      f.sub = sub;
      sub.on("message", (topic, payload) => {
        const d = decodeUp(topic, new Uint8Array(payload));
        if (d.ok) f.got.push(d.message);
      });
      await new Promise<void>((resolve, reject) => {
        sub.once("connect", () => {
          sub.subscribe("k8s4r/robots/+/up/#", { qos: 1 }, (e) => e ? reject(e) : resolve());
        });
        sub.once("error", reject);
      });
    } catch (err) {
      await f.close();
      throw err;
    }
    return f;
  }

  /**
   * Starts a robot's agent (again: same data directory, so the same outbox and journal) and
   * waits for its first connection unless `connect` is false.
   */
  async start(id: string, o: { connect?: boolean; svid?: ReturnType<typeof robotSvid> } = {}) {
    const old = this.robots.get(id);
    const dir = old?.dir ?? await Deno.makeTempDir({ prefix: `k8s4r-fleet-${id}-` });
    const first = o.svid ?? robotSvid(this.broker, id);
    const source = new StaticX509Source(first.svid, first.bundles);
    await writeAgentPlugins(dir, {
      spire: ["  manage: false"],
      mqtt: [
        `  brokerUrl: ssl://127.0.0.1:${this.broker.tlsPort}`,
        "  heartbeatSeconds: 1",
        ...(this.o.sessionExpiry !== undefined
          ? [`  sessionExpirySeconds: ${this.o.sessionExpiry}`]
          : []),
      ],
    });
    const config = await loadAgentConfig({
      cwd: dir,
      env: { ROBOT_ID: id },
      flags: { config: "plugins.yaml" },
    });
    const logs = old?.logs ?? [];
    const agent = new RobotAgent({
      config,
      source,
      cwd: dir,
      log: (event, fields) =>
        logs.push(`${new Date().toISOString()} ${event} ${JSON.stringify(fields ?? {})}`),
      reconnectMinMs: this.o.reconnectMinMs ?? 200,
      reconnectMaxMs: this.o.reconnectMaxMs ?? 1000,
    });
    const r: Robot = { id, dir, source, agent, logs };
    this.robots.set(id, r);
    await agent.start();
    if (o.connect !== false) await this.connected(r, "to connect");
    return r;
  }

  /** Waits for `r` to be connected; throws `BrokerDied` at once when the broker dies meanwhile. */
  private async connected(r: Robot, what: string, done = () => r.agent.session.connected) {
    await waitFor(done, {
      timeoutMs: 15_000,
      what: `${r.id} ${what} (logs: ${r.logs.slice(-5).join(" | ")})`,
      fatal: () => this.broker.running() ? undefined : new BrokerDied(this.broker.exitCode()),
    });
  }

  /** A new SVID: the agent reconnects with it (a new broker session object each time). */
  async rotate(r: Robot): Promise<void> {
    const before = r.agent.stats.connects;
    const next = robotSvid(this.broker, r.id);
    r.source.set(next.svid, next.bundles);
    await this.connected(
      r,
      "to reconnect after its rotation",
      () => r.agent.stats.connects > before && r.agent.session.connected,
    );
  }

  brokerLog(): string {
    return Deno.readTextFileSync(this.broker.files.logFile);
  }

  /** "Client <id> disconnected." lines: one per DISCONNECT, one more per reload while away. */
  disconnectLines(id: string): number {
    return this.brokerLog().split("\n").filter((l) => l.endsWith(`Client ${id} disconnected.`))
      .length;
  }

  /**
   * Waits until the broker has run its session-expiry check (once per wall-clock second) at
   * least once after `since`: two heartbeats of `r` made 2 s after it reached the stand-in.
   * Returns false, at once, when the broker died meanwhile.
   */
  async brokerSecondsPassed(r: Robot, since: number): Promise<boolean> {
    const beats = () =>
      this.got.filter((m): m is HeartbeatMessage =>
        m.type === "heartbeat" && m.robotId === r.id && Date.parse(m.ts) >= since + 2000
      ).length;
    await waitFor(() => beats() >= 2 || !this.broker.running(), {
      timeoutMs: 15_000,
      what: `${r.id}'s heartbeats 2 s after ${new Date(since).toISOString()}`,
    }).catch((err) => {
      const log = this.brokerLog().split("\n").filter((l) => !/Warning|To fix/.test(l));
      throw new Error(
        `${(err as Error).message}; ${r.id}: ${r.logs.slice(-8).join(" | ")}; broker log:\n${
          log.slice(-25).join("\n")
        }`,
      );
    });
    return beats() >= 2;
  }

  statuses(id: string): StatusMessage[] {
    return this.got.filter((m): m is StatusMessage => m.type === "status" && m.robotId === id);
  }

  /** Wills of `id` the broker published ("connection lost"). */
  wills(id: string): StatusMessage[] {
    return this.statuses(id).filter((m) =>
      m.status === "offline" && m.reason === "connection lost"
    );
  }

  /** Drops of the live connection the agent did not plan. */
  unplannedDrops(r: Robot): string[] {
    return r.logs.filter((l) => l.includes("mqtt.disconnected") && l.includes('"planned":false'));
  }

  async close(): Promise<void> {
    for (const r of this.robots.values()) await r.agent.stop().catch(() => {});
    await this.sub?.endAsync(true).catch(() => {});
    await this.broker.stop();
    for (const r of this.robots.values()) {
      await Deno.remove(r.dir, { recursive: true }).catch(() => {});
    }
  }
}
