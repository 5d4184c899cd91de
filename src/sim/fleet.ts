/**
 * A simulated robot fleet: one mqtt.js mTLS connection per robot, each presenting that robot's
 * own X.509 SVID (CN = robot id) to the real broker and authenticating the broker by its SPIFFE
 * ID, exactly like `k8s4r agent`. The robots speak the k8s4r protocol (register, heartbeats,
 * task status) with the encoders of `src/mqtt/messages.ts`, check every task as a robot does
 * (`checkDown`: the fleet server's signature and chain against the bundle, addressed to this
 * robot, not expired, inside the window; each robot with its own chain cache, like one agent
 * process), and answer every task it accepts at once with `done` (exit 0) without running
 * anything.
 *
 * Load shapes: `startHeartbeats(ms)` (every robot once per interval, phases spread evenly) and
 * `burst(ms)` (every robot publishes QoS 1 heartbeats back to back, `window` unacknowledged at
 * a time, i.e. as fast as the broker acknowledges them).
 */
import mqtt from "mqtt";
import type { IClientOptions, MqttClient } from "mqtt";
import {
  decodeDown,
  encode,
  type HeartbeatMessage,
  PROTOCOL_VERSION,
  type RegisterMessage,
  type StatusMessage,
  type TaskStatusMessage,
} from "../mqtt/messages.ts";
import { robotSubscription, upTopic } from "../fleet/topics.ts";
import type { X509BundleSet } from "../spiffe/bundle.ts";
import { parseSpiffeId } from "../spiffe/id.ts";
import { fleetServerSpiffeId, robotSpiffeId } from "../fleet/mod.ts";
import { checkDown, X5cChainCache } from "../mqtt/signed.ts";
import { StaticX509Source } from "../spiffe/source.ts";
import type { X509Svid } from "../spiffe/svid.ts";
import { authorizeId, mtlsClientOptions } from "../spiffe/tls.ts";

export interface SimFleetOptions {
  /** `mqtts://host:port` of the broker's mTLS listener. */
  brokerUrl: string;
  brokerSpiffeId: string;
  /** One SVID per robot; the robot id is the SVID's first DNS name (its CN). */
  svids: { robotId: string; svid: X509Svid }[];
  bundles: X509BundleSet;
  /** Connections opened at the same time. Default 50. */
  connectConcurrency?: number;
  /** Announced heartbeat interval (the server marks a robot offline after 3 misses). */
  heartbeatIntervalSeconds?: number;
  /** Called when a robot receives a task (before it answers). */
  onTask?: (robotId: string, taskId: string, atMs: number) => void;
  /** Called when the broker acknowledged a robot's `done` report. */
  onTaskDone?: (robotId: string, taskId: string, atMs: number) => void;
  connectTimeoutMs?: number;
  /** The only signer accepted. Default spiffe://<the broker's trust domain>/fleet-server. */
  signerSpiffeId?: string;
}

export interface SimFleetStats {
  connected: number;
  connectFailures: number;
  disconnects: number;
  published: number;
  acked: number;
  /** PUBACK with a failure reason code (e.g. 0x87 not authorized by the ACL). */
  denied: number;
  publishErrors: number;
  tasksReceived: number;
  tasksAnswered: number;
  malformed: number;
  /** Tasks `checkDown` refused (bad signature, wrong robot, expired, replay): not answered. */
  refused: number;
  /** The error of the last refusal. */
  lastRefusal?: string;
  /** Connect (TLS + MQTT CONNECT/CONNACK) times, ms. */
  connectMs: number[];
  lastError?: string;
}

interface SimRobot {
  id: string;
  client: MqttClient;
  /** Verified signer chains, per robot as in one agent process. */
  chains: X5cChainCache;
  seq: number;
  svidExpiresAt: string;
}

const now = () => new Date().toISOString();

export class SimFleet {
  readonly robots: SimRobot[] = [];
  readonly stats: SimFleetStats = {
    connected: 0,
    connectFailures: 0,
    disconnects: 0,
    published: 0,
    acked: 0,
    denied: 0,
    publishErrors: 0,
    tasksReceived: 0,
    tasksAnswered: 0,
    malformed: 0,
    refused: 0,
    connectMs: [],
  };
  /**
   * The benchmark's baseline only (bench/fleet.ts, against bench/unsigned_server.ts): decode
   * tasks as unsigned JSON (`decodeDown`, the path before signing). Robots have no such mode:
   * they run only what `checkDown` accepts. Default false.
   */
  unsignedBaseline = false;
  private hbTimers: ReturnType<typeof setTimeout>[] = [];
  private closed = false;

  /** The fleet's trust domain: the broker's. */
  private readonly trustDomain: string;

  private constructor(private readonly o: SimFleetOptions) {
    this.trustDomain = parseSpiffeId(o.brokerSpiffeId).trustDomain.name;
  }

  /** Connects every robot (bounded concurrency), subscribes to its down/#, sends register. */
  static async connect(o: SimFleetOptions): Promise<SimFleet> {
    const fleet = new SimFleet(o);
    const queue = [...o.svids];
    const workers = Array.from({ length: o.connectConcurrency ?? 50 }, async () => {
      while (queue.length) {
        const next = queue.shift()!;
        try {
          fleet.robots.push(await fleet.connectOne(next.robotId, next.svid));
        } catch (err) {
          fleet.stats.connectFailures++;
          fleet.stats.lastError = `${next.robotId}: ${(err as Error).message}`;
        }
      }
    });
    await Promise.all(workers);
    return fleet;
  }

  private connectOne(robotId: string, svid: X509Svid): Promise<SimRobot> {
    const source = new StaticX509Source(svid, this.o.bundles);
    const tls = mtlsClientOptions(source, authorizeId(this.o.brokerSpiffeId));
    const will: StatusMessage = {
      v: PROTOCOL_VERSION,
      type: "status",
      robotId,
      ts: now(),
      status: "offline",
      reason: "connection lost",
    };
    // mqtt.js passes TLS options through to node:tls, which knows checkServerIdentity.
    const opts: IClientOptions & Pick<typeof tls, "checkServerIdentity"> = {
      clientId: robotId,
      protocolVersion: 5,
      clean: true,
      keepalive: 60,
      reconnectPeriod: 1000,
      connectTimeout: this.o.connectTimeoutMs ?? 30_000,
      key: tls.key,
      cert: tls.cert,
      ca: tls.ca,
      rejectUnauthorized: true,
      checkServerIdentity: tls.checkServerIdentity,
      will: {
        topic: upTopic(robotId, "status"),
        payload: Buffer.from(encode(will)),
        qos: 1,
        retain: false,
      },
      manualConnect: true,
    };
    const t0 = performance.now();
    const client = mqtt.connect(this.o.brokerUrl, opts);
    const robot: SimRobot = {
      id: robotId,
      client,
      chains: new X5cChainCache(),
      seq: 0,
      svidExpiresAt: svid.notAfter.toISOString(),
    };
    return new Promise((resolve, reject) => {
      let first = true;
      client.on("connect", () => {
        if (first) {
          first = false;
          this.stats.connectMs.push(performance.now() - t0);
          this.stats.connected++;
        }
        client.subscribe(robotSubscription(robotId), { qos: 1 });
        this.register(robot);
        resolve(robot);
      });
      client.on("close", () => {
        if (!first && !this.closed) this.stats.disconnects++;
      });
      client.on("error", (err) => {
        this.stats.lastError = `${robotId}: ${err.message}`;
        if (first) {
          first = false;
          client.end(true);
          reject(err);
        }
      });
      client.on("message", (topic, payload) => this.onMessage(robot, topic, payload));
      client.connect();
    });
  }

  private publish(robot: SimRobot, kind: "register" | "heartbeat" | "task", msg: object) {
    this.stats.published++;
    return new Promise<boolean>((resolve) => {
      robot.client.publish(
        upTopic(robot.id, kind),
        Buffer.from(encode(msg as HeartbeatMessage)),
        { qos: 1 },
        (err, packet) => {
          const rc = (packet as { reasonCode?: number } | undefined)?.reasonCode ??
            (err as { code?: number } | undefined)?.code;
          if (typeof rc === "number" && rc >= 0x80) {
            this.stats.denied++;
            resolve(false);
          } else if (err) {
            this.stats.publishErrors++;
            this.stats.lastError = `${robot.id}: ${err.message}`;
            resolve(false);
          } else {
            this.stats.acked++;
            resolve(true);
          }
        },
      );
    });
  }

  private register(robot: SimRobot): Promise<boolean> {
    const reg: RegisterMessage = {
      v: PROTOCOL_VERSION,
      type: "register",
      robotId: robot.id,
      ts: now(),
      spiffeId: robotSpiffeId(this.trustDomain, robot.id),
      agentVersion: "sim",
      heartbeatIntervalSeconds: this.o.heartbeatIntervalSeconds ?? 1,
      svidExpiresAt: robot.svidExpiresAt,
      device: {
        hostname: robot.id,
        os: "linux",
        arch: "x86_64",
        cpus: 1,
        memoryBytes: 1 << 30,
        load: [0, 0, 0],
        uptimeSeconds: 1,
      },
    };
    return this.publish(robot, "register", reg);
  }

  heartbeat(robot: SimRobot): Promise<boolean> {
    const hb: HeartbeatMessage = {
      v: PROTOCOL_VERSION,
      type: "heartbeat",
      robotId: robot.id,
      ts: now(),
      seq: robot.seq++,
      svidExpiresAt: robot.svidExpiresAt,
      load: [0.1, 0.1, 0.1],
    };
    return this.publish(robot, "heartbeat", hb);
  }

  private onMessage(robot: SimRobot, topic: string, payload: Uint8Array) {
    const d = this.unsignedBaseline
      ? decodeDown(topic, new Uint8Array(payload))
      : checkDown(topic, new Uint8Array(payload), {
        robotId: robot.id,
        bundles: this.o.bundles,
        signerId: this.o.signerSpiffeId ?? fleetServerSpiffeId(this.trustDomain),
        cache: robot.chains,
      });
    if (!d.ok || d.message.type !== "task") {
      if (!d.ok) {
        const refusal = "kind" in d && (d as { kind: string }).kind === "refused";
        if (refusal) this.stats.refused++;
        else this.stats.malformed++;
        if (refusal) this.stats.lastRefusal = d.error;
      }
      return;
    }
    const task = d.message;
    this.stats.tasksReceived++;
    this.o.onTask?.(robot.id, task.id, performance.now());
    const done: TaskStatusMessage = {
      v: PROTOCOL_VERSION,
      type: "task-status",
      robotId: robot.id,
      ts: now(),
      taskId: task.id,
      state: "done",
      exitCode: 0,
      stdout: "",
      stderr: "",
    };
    void this.publish(robot, "task", done).then((ok) => {
      if (ok) {
        this.stats.tasksAnswered++;
        this.o.onTaskDone?.(robot.id, task.id, performance.now());
      }
    });
  }

  /** Every robot sends a heartbeat every `intervalMs`, phases spread evenly over the interval. */
  startHeartbeats(intervalMs: number): void {
    this.stopHeartbeats();
    this.robots.forEach((r, i) => {
      const phase = Math.floor((i / this.robots.length) * intervalMs);
      const t = setTimeout(() => {
        void this.heartbeat(r);
        const iv = setInterval(() => void this.heartbeat(r), intervalMs);
        this.hbTimers.push(iv);
      }, phase);
      this.hbTimers.push(t);
    });
  }

  stopHeartbeats(): void {
    for (const t of this.hbTimers) {
      clearTimeout(t);
      clearInterval(t);
    }
    this.hbTimers = [];
  }

  /**
   * Every robot publishes heartbeats back to back for `durationMs`, keeping `window` QoS 1
   * messages unacknowledged at a time. Resolves with how many were acknowledged.
   */
  async burst(durationMs: number, window = 1): Promise<{ acked: number; ms: number }> {
    const t0 = performance.now();
    const end = t0 + durationMs;
    let acked = 0;
    const loops: Promise<void>[] = [];
    for (const r of this.robots) {
      for (let w = 0; w < window; w++) {
        loops.push((async () => {
          while (performance.now() < end && !this.closed) {
            if (await this.heartbeat(r)) acked++;
            else await new Promise((res) => setTimeout(res, 50)); // offline: do not spin
          }
        })());
      }
    }
    await Promise.all(loops);
    return { acked, ms: performance.now() - t0 };
  }

  /** Disconnects every robot. */
  async close(): Promise<void> {
    this.closed = true;
    this.stopHeartbeats();
    await Promise.all(this.robots.map((r) =>
      new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          r.client.end(true);
          resolve();
        }, 3000);
        r.client.end(false, {}, () => {
          clearTimeout(t);
          resolve();
        });
      })
    ));
  }
}
