/**
 * A robot that speaks the k8s4r protocol with a plain mqtt.js client over mTLS (test-CA
 * certificates), the way the agent does: a will per connection attempt, register then the
 * retained online on every connect, heartbeats with bootId and seq. The real agent is tested
 * elsewhere; these stand in for it against a real broker and real servers.
 */
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { waitFor } from "../../src/process/mod.ts";
import { upTopic } from "../../src/fleet/topics.ts";
import { type PemCert, TEST_TRUST_DOMAIN, type TestBroker } from "./broker.ts";

const now = () => new Date().toISOString();
const enc = (v: unknown) => JSON.stringify(v);

export function registerMsg(id: string) {
  return enc({
    v: 1,
    type: "register",
    robotId: id,
    ts: now(),
    spiffeId: `spiffe://${TEST_TRUST_DOMAIN}/robot/${id}`,
    agentVersion: "test",
    heartbeatIntervalSeconds: 30,
    svidExpiresAt: new Date(Date.now() + 3600_000).toISOString(),
    device: {
      hostname: id,
      os: "linux",
      arch: "x86_64",
      cpus: 1,
      memoryBytes: 1,
      load: [0, 0, 0],
      uptimeSeconds: 1,
    },
  });
}

/**
 * A robot that speaks the protocol as docs/PROTOCOL.md says the agent does: one `bootId` per
 * process, a `connection` number per connection attempt, the will rebuilt for every attempt,
 * and on every connect `register` first, then the retained `online`. Heartbeats are published
 * on a timer; while disconnected mqtt.js keeps them (QoS 1) and sends them on reconnect.
 */
export class ProtoRobot {
  readonly bootId = crypto.randomUUID();
  connection = 0;
  connects = 0;
  seq = 0;
  readonly client: MqttClient;
  private hbTimer?: ReturnType<typeof setInterval>;

  constructor(
    readonly b: TestBroker,
    readonly id: string,
    cert: PemCert,
    readonly opts: { reconnectPeriodMs: number; heartbeatIntervalSeconds: number },
  ) {
    this.client = mqtt.connect(this.b.tlsUrl, {
      key: cert.key,
      cert: cert.cert,
      ca: cert.ca,
      servername: "localhost",
      rejectUnauthorized: true,
      clientId: id,
      protocolVersion: 5,
      reconnectPeriod: opts.reconnectPeriodMs,
      connectTimeout: 5000,
      manualConnect: true,
    });
    this.nextWill();
    // The will is fixed at CONNECT: prepare the next attempt's as soon as a connection ends.
    this.client.on("close", () => this.nextWill());
    this.client.on("connect", () => {
      this.connects++;
      this.client.publish(upTopic(id, "register"), this.register(), { qos: 1 });
      this.client.publish(upTopic(id, "status"), this.status("online"), { qos: 1, retain: true });
    });
    this.client.on("error", () => {});
  }

  static async start(
    b: TestBroker,
    id: string,
    opts: { reconnectPeriodMs?: number; heartbeatIntervalSeconds?: number } = {},
  ): Promise<ProtoRobot> {
    const r = new ProtoRobot(b, id, await b.issueCert(id), {
      reconnectPeriodMs: opts.reconnectPeriodMs ?? 0,
      heartbeatIntervalSeconds: opts.heartbeatIntervalSeconds ?? 30,
    });
    r.client.connect();
    await waitFor(() => r.connects > 0, { timeoutMs: 10_000, what: `${id} connected` });
    return r;
  }

  private nextWill() {
    this.connection++;
    this.client.options.will = {
      topic: upTopic(this.id, "status"),
      payload: Buffer.from(this.status("offline", "connection lost")),
      qos: 1,
      retain: true,
    };
  }

  register(): string {
    return enc({
      ...JSON.parse(registerMsg(this.id)),
      heartbeatIntervalSeconds: this.opts.heartbeatIntervalSeconds,
      bootId: this.bootId,
      connection: this.connection,
    });
  }

  status(status: "online" | "offline", reason?: string): string {
    return enc({
      v: 1,
      type: "status",
      robotId: this.id,
      ts: now(),
      status,
      ...(reason ? { reason } : {}),
      bootId: this.bootId,
      connection: this.connection,
    });
  }

  /** Publishes a heartbeat every interval, connected or not (mqtt.js queues QoS 1). */
  startHeartbeats() {
    this.hbTimer = setInterval(() => {
      this.seq++;
      this.client.publish(
        upTopic(this.id, "heartbeat"),
        enc({
          v: 1,
          type: "heartbeat",
          robotId: this.id,
          ts: now(),
          seq: this.seq,
          bootId: this.bootId,
          svidExpiresAt: new Date(Date.now() + 3600_000).toISOString(),
        }),
        { qos: 1 },
        () => {},
      );
    }, this.opts.heartbeatIntervalSeconds * 1000);
  }

  /** Stays connected but falls silent (a hung agent, a network that drops only its data). */
  stopHeartbeats() {
    clearInterval(this.hbTimer);
  }

  /** The process dies: the socket is destroyed without DISCONNECT, nothing reconnects. */
  crash() {
    clearInterval(this.hbTimer);
    this.client.end(true);
  }

  async close() {
    clearInterval(this.hbTimer);
    await this.client.endAsync(true).catch(() => {});
  }
}

/** Log lines of a server, with the time each was written. */
export function captureLog() {
  const lines: { at: number; msg: string }[] = [];
  return {
    lines,
    logger: {
      info: (msg: string) => lines.push({ at: Date.now(), msg }),
      warn: (msg: string) => lines.push({ at: Date.now(), msg }),
    },
  };
}
