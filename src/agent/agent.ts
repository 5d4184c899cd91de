/**
 * The robot agent: its SVID from the SPIFFE Workload API, an mTLS MQTT session to the broker
 * (rotating with the SVID), register then "online" on every connect, heartbeats, and tasks.
 *
 * - Every connection attempt gets its own last will, `offline` / `connection lost` with this
 *   process's `bootId` and the attempt's `connection` number; the `register` and retained
 *   `online` of that connection carry the same pair, so the server orders them without clocks
 *   (docs/PROTOCOL.md, "Ordering statuses without clocks").
 * - Results (task-status) and heartbeats go through the durable outbound queue (outbox.ts):
 *   removed on PUBACK, sent again after a restart.
 * - At start, tasks a crash interrupted are stopped and reported `failed: agent restarted`.
 * - Every task and cancel is checked by `checkDown` (src/mqtt/signed.ts) before anything acts on
 *   it: signed by the configured fleet server, chain under this robot's bundle, addressed to this
 *   robot, not expired, `createdAt` inside the window; then its id must be new (the durable id
 *   store). Refusals of tasks are counted and reported best-effort (`refused` with a `reason`),
 *   rate-limited and outside the durable queue, so a flood of forged or replayed messages can
 *   neither fill the queue nor make the robot flood the broker.
 *
 * `RobotAgent` is the MQTT/task part, given an `X509SvidSource`; `runAgent` is the whole life of
 * `k8s4r agent`: optional supervised spire-agent, the X509Source, the RobotAgent, and a clean
 * stop when the signal aborts.
 */
import type { Writer } from "../cli/io.ts";
import { VERSION } from "../version.ts";
import {
  encode,
  type HeartbeatMessage,
  now,
  PROTOCOL_VERSION,
  REFUSAL_REASONS,
  type RefusalReason,
  type RegisterMessage,
  type RobotStatus,
  type StatusMessage,
  type TaskReportState,
} from "../mqtt/messages.ts";
import { checkDown, X5cChainCache } from "../mqtt/signed.ts";
import { robotSubscription, upTopic } from "../fleet/topics.ts";
import type { X509SvidSource } from "../spiffe/source.ts";
import { authorizeId, mtlsClientOptions } from "../spiffe/tls.ts";
import type { AgentConfig } from "./config.ts";
import { deviceInfo, loadAverage } from "./device_info.ts";
import {
  type Logger,
  MqttSession,
  type PublishOutcome,
  type SessionStats,
  type TlsSnapshot,
} from "./mqtt_session.ts";
import {
  Outbox,
  type OutboxEntry,
  type OutboxKind,
  type OutboxStats,
  resultTaken,
} from "./outbox.ts";
import { sandboxToolsMissing, type TaskReport, TaskRunner } from "./task_runner.ts";
import type { TaskUser } from "./task_user.ts";
import { encodeTaskStatus } from "./task_status.ts";
import { AgentMetrics } from "./metrics.ts";

/** Reports after which a task's outcome is known; nothing comes after them. */
const FINAL_REPORTS: readonly TaskReportState[] = ["done", "failed", "refused", "cancelled"];

/** Best-effort refusal reports: a burst of this many, then one per REFILL_MS. */
const REPORT_BURST = 20;
const REPORT_REFILL_MS = 3000;

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
  /** Tasks refused because they could not be trusted, by reason (none of them ran). */
  refused: Record<RefusalReason, number>;
  /** Cancels refused, by reason (nothing was cancelled). */
  refusedCancels: Record<RefusalReason, number>;
  cancels: number;
  /** Cancels of a task seen and finished: nothing to do. */
  cancelNotRunning: number;
  /** Refusal reports published / not published (rate limit, or not connected). */
  refusalReportsSent: number;
  refusalReportsSuppressed: number;
  /** The durable outbound queue (undefined before start). */
  queue?: OutboxStats;
}

export interface RobotAgentOptions {
  config: AgentConfig;
  source: X509SvidSource;
  log: Logger;
  /** Working directory for tasks that name none (with a task user: its home, or /). */
  cwd: string;
  /**
   * The resolved `tasks.user` (`resolveTaskUser`); required when the config sets one and
   * allows tasks.
   */
  taskUser?: TaskUser;
  /** Test knobs. */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  expiryCheckMs?: number;
  /**
   * True while the Workload API stream is healthy. Default: the source has no `lastError`
   * (`X509Source` sets it on a stream failure and clears it on the next update).
   */
  workloadApiUp?: () => boolean;
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
  /**
   * One per agent process: lets the server tell a restart (seq back to 1) from lost heartbeats,
   * and a will of this process from one of a process that is gone.
   */
  readonly bootId: string = crypto.randomUUID();
  /** The connection whose register and online were published last (0: none yet). */
  private connection = 0;
  private outbox?: Outbox;
  private opening?: Promise<Outbox>;
  private starting?: Promise<void>;
  private stopped = false;
  private readonly running = new Set<Promise<unknown>>();
  private readonly counters = {
    heartbeats: 0,
    registers: 0,
    malformed: 0,
    tasks: 0,
    duplicateTasks: 0,
    refused: zeroReasons(),
    refusedCancels: zeroReasons(),
    cancels: 0,
    cancelNotRunning: 0,
    refusalReportsSent: 0,
    refusalReportsSuppressed: 0,
  };
  private readonly cfg: AgentConfig;
  private readonly chains = new X5cChainCache();
  private reportTokens = REPORT_BURST;
  private reportRefilledAt = Date.now();
  /** Its gauges: the loopback `/metrics` page and the heartbeat's telemetry fields. */
  readonly metrics: AgentMetrics;

  constructor(private readonly o: RobotAgentOptions) {
    const cfg = (this.cfg = o.config);
    const id = cfg.robotId;
    const t = cfg.tasks;
    if (t.user !== undefined && t.allow.length > 0 && o.taskUser === undefined) {
      throw new Error(
        `tasks.user is ${JSON.stringify(t.user)}: resolve it (resolveTaskUser) and pass taskUser`,
      );
    }
    const workloadApiUp = o.workloadApiUp ??
      (() => (o.source as { lastError?: unknown }).lastError === undefined);
    this.metrics = new AgentMetrics({
      robotId: id,
      version: VERSION,
      svid: () => {
        const s = o.source.getX509Svid();
        return { notBefore: s.notBefore, notAfter: s.notAfter, serial: s.serialNumber };
      },
      trustBundle: () => {
        const b = o.source.getX509BundleForTrustDomain(cfg.spire.trustDomain);
        return b?.authorities.map((c) => ({
          notBefore: new Date(c.validFrom),
          notAfter: new Date(c.validTo),
        }));
      },
      workloadApiUp,
      broker: () => ({ connected: this.session.connected, connects: this.session.stats.connects }),
      outboundQueueDepth: () => this.outbox?.stats.entries ?? 0,
      counters: () => ({
        heartbeats: this.counters.heartbeats,
        tasks: this.counters.tasks,
        malformed: this.counters.malformed,
        denied: this.session.stats.denied,
      }),
    });
    this.tasks = new TaskRunner({
      allow: t.allow,
      allowEnv: t.allowEnv,
      stateDir: cfg.stateDir,
      defaultCwd: o.taskUser ? taskUserCwd(o.taskUser) : o.cwd,
      killGraceMs: t.killGraceSeconds * 1000,
      window: { clockSkewSeconds: t.clockSkewSeconds, maxAgeSeconds: t.maxAgeSeconds },
      user: o.taskUser,
      limits: {
        cpuSeconds: t.cpuSeconds,
        memoryBytes: t.memoryBytes,
        openFiles: t.openFiles,
        processes: t.maxProcesses,
      },
      maxConcurrent: t.maxConcurrent,
      log: o.log,
      refuseReason: () => {
        const q = this.outbox;
        if (!q?.resultsFull) return undefined;
        const s = q.stats;
        return `outbound queue full: ${s.results} results (${s.bytes} bytes) wait for the broker (queue.maxMessages ${cfg.queue.maxMessages}, queue.maxBytes ${cfg.queue.maxBytes})`;
      },
    });
    this.session = new MqttSession({
      url: cfg.mqtt.brokerUrl,
      clientId: id,
      tls: () => tlsSnapshot(o.source, cfg.mqtt.brokerSpiffeId),
      keepaliveSeconds: cfg.mqtt.keepaliveSeconds,
      sessionExpirySeconds: cfg.mqtt.sessionExpirySeconds,
      // Rebuilt for every connection attempt (a will is fixed at CONNECT).
      will: (connection) => ({
        topic: upTopic(id, "status"),
        payload: encode(this.statusMessage("offline", "connection lost", connection)),
        retain: true,
      }),
      subscriptions: [robotSubscription(id)],
      rotationMarginMs: cfg.rotation.marginSeconds * 1000,
      reconnectMinMs: o.reconnectMinMs,
      reconnectMaxMs: o.reconnectMaxMs,
      expiryCheckMs: o.expiryCheckMs,
      log: o.log,
      onConnect: (info) => this.onConnect(info.connection),
      onMessage: (topic, payload) => this.onMessage(topic, payload),
    });
  }

  get stats(): AgentStats {
    const c = this.counters;
    return {
      ...this.session.stats,
      ...c,
      refused: { ...c.refused },
      refusedCancels: { ...c.refusedCancels },
      queue: this.outbox?.stats,
    };
  }

  private statusMessage(status: RobotStatus, reason: string | undefined, connection: number) {
    const m: StatusMessage = {
      v: PROTOCOL_VERSION,
      type: "status",
      robotId: this.cfg.robotId,
      ts: now(),
      status,
      bootId: this.bootId,
      connection,
    };
    if (reason !== undefined) m.reason = reason;
    return m;
  }

  /**
   * Opens the outbound queue and sends again what a previous run left, stops and reports the
   * tasks a crash interrupted, then connects. Throws when the SVID carries another identity.
   */
  start(): Promise<void> {
    this.starting ??= this.doStart();
    return this.starting;
  }

  private async doStart(): Promise<void> {
    const svid = this.o.source.getX509Svid();
    if (svid.id.toString() !== this.cfg.spiffeId) {
      throw new Error(
        `the SVID carries ${svid.id.toString()}, expected ${this.cfg.spiffeId}`,
      );
    }
    if (this.cfg.tasks.allow.length > 0) {
      const missing = sandboxToolsMissing();
      if (missing.length > 0) {
        throw new Error(
          `tasks need util-linux ${
            missing.join(" and ")
          } (rlimits, user switch, no_new_privs, death signal): install util-linux, or set no tasks.allow`,
        );
      }
    }
    if (this.cfg.tasks.allow.length > 0) {
      const c = this.tasks.containment;
      if (c.kind === "cgroup") this.o.log("tasks.containment", { cgroup: c.parent });
      else {
        // Said, not hidden: what a task moves out of its process group may outlive it.
        this.o.log("tasks.uncontained", { reason: c.reason, hint: c.hint });
      }
    }
    // The id store first: what it has forgotten bounds every message's age from the first one.
    await this.tasks.ids.load();
    this.opening = Outbox.open({
      stateDir: this.cfg.stateDir,
      robotId: this.cfg.robotId,
      maxMessages: this.cfg.queue.maxMessages,
      maxBytes: this.cfg.queue.maxBytes,
      log: this.o.log,
    });
    const box = (this.outbox = await this.opening);
    const finals = new Set<string>();
    for (const e of box.recovered) {
      const m = e.message;
      if (m.type === "task-status" && FINAL_REPORTS.includes(m.state)) {
        finals.add(m.taskId);
      }
    }
    if (box.recovered.length > 0 || box.stats.corrupt > 0) {
      this.o.log("outbox.recovered", {
        results: box.recovered.filter((e) => e.kind === "result").length,
        heartbeats: box.recovered.filter((e) => e.kind === "heartbeat").length,
        corrupt: box.stats.corrupt,
      });
    }
    // Sent again once connected, after register and online (the server deduplicates).
    for (const e of box.recovered) this.send(e);
    await this.tasks.recover((r) => this.report(r), (id) => finals.has(id));
    if (this.stopped) return;
    this.unsubscribe = this.o.source.onUpdate(() => {
      const s = this.o.source.getX509Svid();
      if (s.id.toString() !== this.cfg.spiffeId) {
        // Never present another identity: keep the old material and say so.
        this.o.log("svid.wrong_id", { got: s.id.toString(), want: this.cfg.spiffeId });
        return;
      }
      this.o.log("svid.updated", { expires: s.notAfter.toISOString() });
      this.metrics.observeSvid();
      this.session.refreshTls("SVID or bundle update");
    });
    this.metrics.observeSvid();
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

  /** Publishes a queued entry; forgets it once the broker acknowledged (or refused) it. */
  private send(e: OutboxEntry): Promise<PublishOutcome> {
    return this.track(
      this.session.publish(e.topic, e.payload, { signal: e.dropped }).then((outcome) => {
        // "abandoned" (closing) and "cancelled" (dropped) stay as they are in the queue.
        if (outcome === "acked" || outcome === "denied") this.outbox?.remove(e.seq);
        return outcome;
      }),
    );
  }

  /**
   * Queues durably, then publishes. `queued` resolves once the message is on disk; `sent` once
   * the broker acknowledged it ("dropped": no room for a heartbeat, or the agent stopped).
   */
  private enqueue(kind: OutboxKind, topic: string, payload: Uint8Array) {
    const box = this.outbox ? Promise.resolve(this.outbox) : this.opening;
    if (!box) throw new Error("RobotAgent.start() was not called");
    // Order is kept: add() calls run in call order, and so do their continuations.
    const queued = box.then((b) => b.add(kind, topic, payload));
    const sent = this.track(
      queued.then((e) => (e ? this.send(e) : ("dropped" as const))),
    );
    return { queued, sent };
  }

  private onConnect(connection: number) {
    const id = this.cfg.robotId;
    this.connection = connection;
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
      svidIssuedAt: svid.notBefore.toISOString(),
      device: deviceInfo(),
      bootId: this.bootId,
      connection,
    };
    this.counters.registers++;
    // register first, then the retained online, both of this connection (not queued on disk:
    // they are regenerated on every connect).
    this.track(this.session.publish(upTopic(id, "register"), encode(reg)));
    const online = this.statusMessage("online", undefined, connection);
    this.track(this.session.publish(upTopic(id, "status"), encode(online), { retain: true }));
  }

  /** Queues one heartbeat (durably) and publishes it; resolves when acknowledged. */
  heartbeat(): Promise<unknown> {
    const t = this.metrics.heartbeatFields();
    const hb: HeartbeatMessage = {
      v: PROTOCOL_VERSION,
      type: "heartbeat",
      robotId: this.cfg.robotId,
      ts: now(),
      seq: this.seq++,
      bootId: this.bootId,
      svidExpiresAt: this.o.source.getX509Svid().notAfter.toISOString(),
      load: loadAverage(),
      // Telemetry (optional fields, docs/PROTOCOL.md): what the fleet's alerts need.
      ...(t.svidIssuedAt ? { svidIssuedAt: t.svidIssuedAt } : {}),
      workloadApi: t.workloadApi,
      outboundQueueDepth: t.outboundQueueDepth,
    };
    this.counters.heartbeats++;
    return this.enqueue("heartbeat", upTopic(this.cfg.robotId, "heartbeat"), encode(hb)).sent;
  }

  private onMessage(topic: string, payload: Uint8Array) {
    const t = this.cfg.tasks;
    const v = checkDown(topic, payload, {
      robotId: this.cfg.robotId,
      bundles: this.o.source,
      signerId: t.signerSpiffeId,
      // The clock, the window, and what the id store can vouch for.
      ...this.tasks.timeRules(),
      cache: this.chains,
    });
    if (!v.ok && v.kind === "malformed") {
      this.counters.malformed++;
      this.o.log("mqtt.malformed", { topic, reason: v.reason, error: v.error });
      return;
    }
    if (!v.ok) {
      if (v.type === "cancel") {
        this.counters.refusedCancels[v.reason]++;
        this.o.log("cancel.refused", { task: v.taskId, reason: v.reason, error: v.error });
        return;
      }
      this.counters.refused[v.reason]++;
      this.o.log("task.refused", { task: v.taskId, reason: v.reason, error: v.error });
      if (v.taskId !== undefined) this.refusalReport(v.taskId, v.reason, v.error);
      return;
    }
    const m = v.message;
    if (m.type === "cancel") {
      this.counters.cancels++;
      const why = `cancelled by the fleet server${m.reason ? `: ${m.reason}` : ""}`;
      const p = this.tasks.cancel(
        m.taskId,
        why,
        (r) => this.report(r),
        m.ts,
      ).then((outcome) => {
        if (outcome === "not-running") this.counters.cancelNotRunning++;
        this.o.log("task.cancel", { task: m.taskId, outcome });
      });
      this.track(p);
      return;
    }
    this.counters.tasks++;
    this.o.log("task.received", { task: m.id, exe: m.command[0], timeout: m.timeoutSeconds });
    const p = this.tasks.handle(
      {
        id: m.id,
        command: m.command,
        env: m.env,
        cwd: m.cwd,
        timeoutSeconds: m.timeoutSeconds,
        createdAt: m.createdAt,
      },
      (r) => this.report(r),
    ).then((how) => {
      if (how === "duplicate") this.counters.duplicateTasks++;
      if (how === "replay") {
        this.counters.refused.replay++;
        const error = "replay: task id seen before; it never runs twice";
        this.o.log("task.refused", { task: m.id, reason: "replay", error });
        this.refusalReport(m.id, "replay", error);
      }
    });
    this.track(p);
  }

  /**
   * A refusal of a task that could not be trusted: published once (QoS 1) when connected and
   * within the rate limit, never queued on disk; otherwise only counted.
   */
  private refusalReport(taskId: string, reason: RefusalReason, error: string): void {
    const nowMs = Date.now();
    const refill = Math.floor((nowMs - this.reportRefilledAt) / REPORT_REFILL_MS);
    if (refill > 0) {
      this.reportTokens = Math.min(REPORT_BURST, this.reportTokens + refill);
      this.reportRefilledAt += refill * REPORT_REFILL_MS;
    }
    if (this.reportTokens < 1 || !this.session.connected) {
      this.counters.refusalReportsSuppressed++;
      return;
    }
    this.reportTokens--;
    this.counters.refusalReportsSent++;
    const payload = encodeTaskStatus(this.cfg.robotId, {
      taskId,
      state: "refused",
      reason,
      error,
    });
    this.track(this.session.publish(upTopic(this.cfg.robotId, "task"), payload));
  }

  /**
   * Queues a task-status durably; resolves once it is on disk (sent in the background): true;
   * `{ durable }` when its write failed (kept in memory, sent, written again: the runner keeps
   * the task in its journal until it is on disk); false when it could not be queued (the agent
   * is stopping). See `Reporter` in task_runner.ts.
   */
  private report(r: TaskReport): Promise<ReturnType<typeof resultTaken>> {
    this.o.log("task.report", { task: r.taskId, state: r.state, exit: r.exitCode, error: r.error });
    const payload = encodeTaskStatus(this.cfg.robotId, r);
    return this.enqueue("result", upTopic(this.cfg.robotId, "task"), payload).queued.then(
      resultTaken,
    );
  }

  /** Stops tasks (their results queued), says "offline", waits (bounded) for acks, disconnects. */
  async stop(reason = "agent stopped"): Promise<void> {
    this.stopped = true;
    // From now on a delivered task is refused (and its id claimed), never started.
    this.tasks.refuseNew("agent stopping");
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.unsubscribe?.();
    // A start still recovering interrupted tasks finishes first: their reports must be queued.
    await this.starting?.catch(() => {});
    await this.tasks.stopAll();
    if (this.session.connected) {
      const offline = this.statusMessage("offline", reason, this.connection);
      this.track(
        this.session.publish(upTopic(this.cfg.robotId, "status"), encode(offline), {
          retain: true,
        }),
      );
    }
    await this.session.close(5000);
    await Promise.allSettled([...this.running]);
    await this.outbox?.close();
    await this.tasks.ids.close().catch(() => {});
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
      refused: s.refused,
      refusedCancels: s.refusedCancels,
      refusalReports: s.refusalReportsSent,
      refusalReportsSuppressed: s.refusalReportsSuppressed,
      queued: s.queue?.entries,
      unwritten: s.queue?.unwritten,
    });
  }
}

function zeroReasons(): Record<RefusalReason, number> {
  return Object.fromEntries(REFUSAL_REASONS.map((r) => [r, 0])) as Record<RefusalReason, number>;
}

/** Where tasks of the task user run when they name no cwd: its home when it exists, else /. */
function taskUserCwd(u: TaskUser): string {
  try {
    if (u.home && Deno.statSync(u.home).isDirectory) return u.home;
  } catch { /* no home */ }
  return "/";
}
