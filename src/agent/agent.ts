/**
 * The robot agent: its SVID from the SPIFFE Workload API, an mTLS MQTT session to the broker
 * (rotating with the SVID), register on every connect, heartbeats, and tasks.
 *
 * `RobotAgent` is the MQTT/task part, given an `X509SvidSource`; `runAgent` is the whole life of
 * `k8s4r agent`: optional supervised spire-agent, the X509Source, the RobotAgent, and a clean
 * stop when the signal aborts.
 */
import type { Writer } from "../cli/io.ts";
import { VERSION } from "../version.ts";
import {
  decodeDown,
  encode,
  type HeartbeatMessage,
  now,
  PROTOCOL_VERSION,
  type RegisterMessage,
  type StatusMessage,
  type TaskStatusMessage,
} from "../mqtt/messages.ts";
import { robotSubscription, upTopic } from "../fleet/topics.ts";
import type { X509SvidSource } from "../spiffe/source.ts";
import { authorizeId, mtlsClientOptions } from "../spiffe/tls.ts";
import type { AgentConfig } from "./config.ts";
import { deviceInfo, loadAverage } from "./device_info.ts";
import { type Logger, MqttSession, type SessionStats, type TlsSnapshot } from "./mqtt_session.ts";
import { type TaskReport, TaskRunner } from "./task_runner.ts";

/** One line per event on stderr: `<time> agent <event> key=value ...`. Never secrets. */
export function lineLogger(out: Writer, robotId: string): Logger {
  return (event, fields = {}) => {
    const parts = [new Date().toISOString(), `agent[${robotId}]`, event];
    for (const [k, v] of Object.entries(fields)) {
      if (v === undefined) continue;
      const s = typeof v === "string" ? v : JSON.stringify(v);
      parts.push(`${k}=${/[\s"=]/.test(s) || s === "" ? JSON.stringify(s) : s}`);
    }
    out.write(parts.join(" ") + "\n");
  };
}

export interface AgentStats extends SessionStats {
  heartbeats: number;
  registers: number;
  malformed: number;
  tasks: number;
  duplicateTasks: number;
}

export interface RobotAgentOptions {
  config: AgentConfig;
  source: X509SvidSource;
  log: Logger;
  /** Working directory for tasks that name none. */
  cwd: string;
  /** Test knobs. */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  expiryCheckMs?: number;
}

/** Builds a TLS snapshot from the source: our SVID, the bundle, the broker's SPIFFE ID check. */
export function tlsSnapshot(source: X509SvidSource, brokerSpiffeId: string): TlsSnapshot {
  const o = mtlsClientOptions(source, authorizeId(brokerSpiffeId));
  const svid = source.getX509Svid();
  return {
    key: o.key,
    cert: o.cert,
    ca: o.ca,
    checkServerIdentity: o.checkServerIdentity,
    notAfter: svid.notAfter,
    notBefore: svid.notBefore,
  };
}

export class RobotAgent {
  readonly session: MqttSession;
  readonly tasks: TaskRunner;
  private heartbeatTimer?: ReturnType<typeof setInterval>;
  private unsubscribe?: () => void;
  private seq = 1;
  /** Lets the server tell an agent restart (seq back to 1) from lost heartbeats. */
  private readonly bootId = crypto.randomUUID();
  private readonly running = new Set<Promise<unknown>>();
  private readonly counters = {
    heartbeats: 0,
    registers: 0,
    malformed: 0,
    tasks: 0,
    duplicateTasks: 0,
  };
  private readonly cfg: AgentConfig;

  constructor(private readonly o: RobotAgentOptions) {
    const cfg = (this.cfg = o.config);
    const id = cfg.robotId;
    this.tasks = new TaskRunner({
      allow: cfg.tasks.allow,
      stateDir: cfg.stateDir,
      defaultCwd: o.cwd,
      killGraceMs: cfg.tasks.killGraceSeconds * 1000,
      log: o.log,
    });
    const will: StatusMessage = {
      v: PROTOCOL_VERSION,
      type: "status",
      robotId: id,
      ts: now(),
      status: "offline",
      reason: "connection lost",
    };
    this.session = new MqttSession({
      url: cfg.mqtt.brokerUrl,
      clientId: id,
      tls: () => tlsSnapshot(o.source, cfg.mqtt.brokerSpiffeId),
      keepaliveSeconds: cfg.mqtt.keepaliveSeconds,
      sessionExpirySeconds: cfg.mqtt.sessionExpirySeconds,
      will: { topic: upTopic(id, "status"), payload: encode(will), retain: true },
      subscriptions: [robotSubscription(id)],
      rotationMarginMs: cfg.rotation.marginSeconds * 1000,
      reconnectMinMs: o.reconnectMinMs,
      reconnectMaxMs: o.reconnectMaxMs,
      expiryCheckMs: o.expiryCheckMs,
      log: o.log,
      onConnect: () => this.onConnect(),
      onMessage: (topic, payload) => this.onMessage(topic, payload),
    });
  }

  get stats(): AgentStats {
    return { ...this.session.stats, ...this.counters };
  }

  start(): void {
    const svid = this.o.source.getX509Svid();
    if (svid.id.toString() !== this.cfg.spiffeId) {
      throw new Error(
        `the SVID carries ${svid.id.toString()}, expected ${this.cfg.spiffeId}`,
      );
    }
    this.unsubscribe = this.o.source.onUpdate(() => {
      const s = this.o.source.getX509Svid();
      if (s.id.toString() !== this.cfg.spiffeId) {
        // Never present another identity: keep the old material and say so.
        this.o.log("svid.wrong_id", { got: s.id.toString(), want: this.cfg.spiffeId });
        return;
      }
      this.o.log("svid.updated", { expires: s.notAfter.toISOString() });
      this.session.refreshTls("SVID or bundle update");
    });
    this.session.start();
    this.heartbeatTimer = setInterval(
      () => this.heartbeat(),
      this.cfg.mqtt.heartbeatSeconds * 1000,
    );
  }

  private track<T>(p: Promise<T>): Promise<T> {
    this.running.add(p);
    p.finally(() => this.running.delete(p)).catch(() => {});
    return p;
  }

  private onConnect() {
    const id = this.cfg.robotId;
    const svid = this.o.source.getX509Svid();
    const reg: RegisterMessage = {
      v: PROTOCOL_VERSION,
      type: "register",
      robotId: id,
      ts: now(),
      spiffeId: this.cfg.spiffeId,
      agentVersion: VERSION,
      heartbeatIntervalSeconds: this.cfg.mqtt.heartbeatSeconds,
      svidExpiresAt: svid.notAfter.toISOString(),
      device: deviceInfo(),
    };
    this.counters.registers++;
    this.track(this.session.publish(upTopic(id, "register"), encode(reg)));
    const online: StatusMessage = {
      v: PROTOCOL_VERSION,
      type: "status",
      robotId: id,
      ts: now(),
      status: "online",
    };
    this.track(this.session.publish(upTopic(id, "status"), encode(online), { retain: true }));
  }

  /** Publishes one heartbeat (QoS 1; held while offline, so none is lost). */
  heartbeat(): Promise<unknown> {
    const hb: HeartbeatMessage = {
      v: PROTOCOL_VERSION,
      type: "heartbeat",
      robotId: this.cfg.robotId,
      ts: now(),
      seq: this.seq++,
      bootId: this.bootId,
      svidExpiresAt: this.o.source.getX509Svid().notAfter.toISOString(),
      load: loadAverage(),
    };
    this.counters.heartbeats++;
    return this.track(this.session.publish(upTopic(this.cfg.robotId, "heartbeat"), encode(hb)));
  }

  private onMessage(topic: string, payload: Uint8Array) {
    const d = decodeDown(topic, payload);
    if (!d.ok) {
      this.counters.malformed++;
      this.o.log("mqtt.malformed", { topic, reason: d.reason, error: d.error });
      return;
    }
    if (d.robotId !== this.cfg.robotId) {
      this.counters.malformed++;
      this.o.log("mqtt.malformed", { topic, reason: "robot-id-mismatch" });
      return;
    }
    const m = d.message;
    if (m.type === "cancel") {
      const ok = this.tasks.cancel(m.taskId, m.reason ? `cancelled: ${m.reason}` : "cancelled");
      this.o.log("task.cancel", { task: m.taskId, running: ok });
      return;
    }
    this.counters.tasks++;
    this.o.log("task.received", { task: m.id, exe: m.command[0], timeout: m.timeoutSeconds });
    const p = this.tasks.handle(
      { id: m.id, command: m.command, env: m.env, cwd: m.cwd, timeoutSeconds: m.timeoutSeconds },
      (r) => this.report(r),
    ).then((how) => {
      if (how === "duplicate") this.counters.duplicateTasks++;
    });
    this.track(p);
  }

  private report(r: TaskReport) {
    const msg: TaskStatusMessage = {
      v: PROTOCOL_VERSION,
      type: "task-status",
      robotId: this.cfg.robotId,
      ts: now(),
      taskId: r.taskId,
      state: r.state,
    };
    if (r.exitCode !== undefined) msg.exitCode = r.exitCode;
    if (r.stdout !== undefined) msg.stdout = r.stdout;
    if (r.stderr !== undefined) msg.stderr = r.stderr;
    if (r.error !== undefined) msg.error = r.error;
    this.o.log("task.report", { task: r.taskId, state: r.state, exit: r.exitCode, error: r.error });
    this.track(this.session.publish(upTopic(this.cfg.robotId, "task"), encode(msg)));
  }

  /** Stops tasks, says "offline", waits (bounded) for acks, disconnects. */
  async stop(reason = "agent stopped"): Promise<void> {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.unsubscribe?.();
    await this.tasks.stopAll();
    const offline: StatusMessage = {
      v: PROTOCOL_VERSION,
      type: "status",
      robotId: this.cfg.robotId,
      ts: now(),
      status: "offline",
      reason,
    };
    if (this.session.connected) {
      this.track(
        this.session.publish(upTopic(this.cfg.robotId, "status"), encode(offline), {
          retain: true,
        }),
      );
    }
    await this.session.close(5000);
    await Promise.allSettled([...this.running]);
    const s = this.stats;
    this.o.log("agent.stopped", {
      connects: s.connects,
      reconnects: s.reconnects,
      rotations: s.rotations,
      sent: s.sent,
      acked: s.acked,
      denied: s.denied,
      buffered: s.buffered,
      malformed: s.malformed,
    });
  }
}
