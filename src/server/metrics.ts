/**
 * The fleet server's Prometheus metrics (`GET /metrics`); the catalogue is docs/METRICS.md.
 *
 * `FleetMetrics` depends on small source interfaces, not on the registry or the MQTT client:
 * a robot list, the message counters, task counts by state, the MQTT connection state and,
 * optionally, the trust bundle. Everything that a scrape can read from them is collected at
 * scrape time, from one snapshot per scrape; only what happens between scrapes is recorded
 * through hooks: storage timings (`storage.time`), finished tasks (`taskFinished`) and the
 * agent-side values that heartbeats carry (`recordRobotTelemetry`).
 *
 * Per-robot series carry one label, `robot` (8 series per robot, see docs/METRICS.md for the
 * cardinality at 10,000 robots).
 */
import { FINAL_STATES, TASK_STATES as ALL_TASK_STATES } from "./tasks.ts";
import { decodePemOfType } from "../spiffe/pem.ts";
import { parseCertDer } from "../spiffe/x509.ts";
import {
  Counter,
  epochSeconds,
  Gauge,
  Histogram,
  METRICS_CONTENT_TYPE,
  type MetricsRenderer,
  Registry,
  Serial,
} from "../metrics/mod.ts";

/**
 * One robot as the metrics need it. `RobotRecord` (registry.ts) fits as is; the optional fields
 * come from heartbeats (see `recordRobotTelemetry`) when the source does not carry them.
 */
export interface RobotSample {
  id: string;
  online: boolean;
  /** Set while the server cannot tell the robot's state (broker outage): no online sample. */
  unknownSince?: string | null;
  /** RFC 3339. */
  lastSeen: string;
  /** The SVID's notAfter (RFC 3339), as last reported. */
  svidExpiresAt: string | null;
  /** The SVID's notBefore (RFC 3339), as last reported. */
  svidIssuedAt?: string | null;
  heartbeatsReceived: number;
  heartbeatsMissing: number;
  /** The agent's view of its Workload API at its last heartbeat. */
  workloadApiUp?: boolean | null;
  /** Messages in the agent's outbound queue at its last heartbeat. */
  outboundQueueDepth?: number | null;
}

/** The counters `FleetService.stats` keeps (`FleetStats` fits as is). */
export interface MessageStats {
  received: Readonly<Record<string, number>>;
  dropped: Readonly<Record<string, number>>;
  tasksDispatched: number;
  publishErrors: number;
  /** Task reports ignored by the state machine (duplicates, out of order). */
  staleTaskReports?: number;
  /** Task reports for a task that is not this robot's. */
  unknownTaskReports?: number;
  /** `refused` task reports by reason (`task`: no reason, an ordinary refusal). */
  refusals?: Readonly<Record<string, number>>;
  /** Tasks or cancels that could not be signed (the server's SVID), hence not sent. */
  signErrors?: number;
}

export interface MqttState {
  /** Connected and subscribed. */
  connected: boolean;
  /** Successful CONNECTs since the process started. */
  connects: number;
}

/** One CA certificate of the trust bundle. */
export interface CaValidity {
  notBefore: Date;
  notAfter: Date;
}

type MaybePromise<T> = T | Promise<T>;

export interface FleetMetricsSources {
  robots(): MaybePromise<Iterable<RobotSample>>;
  stats(): MessageStats;
  /** Tasks by state (`Registry.countTasksByState`). */
  taskCounts(): MaybePromise<Readonly<Record<string, number>>>;
  mqtt(): MqttState;
  /** The CAs the fleet trusts; omit when the server does not know the bundle. */
  trustBundle?(): readonly CaValidity[] | undefined;
}

export interface FleetMetricsOptions {
  version?: string;
  now?: () => Date;
  /**
   * Time the scrape's own source reads as `op="read"` (default true). False when the sources
   * are a registry whose timer (`Registry.setTimer`) times every read already.
   */
  timeSourceReads?: boolean;
  /** A scrape waits this long for its source reads; then those series are absent. Default 5000. */
  readTimeoutMs?: number;
}

/** What a registry operation was for; a closed set, so the label stays bounded. */
export type { StorageOp } from "./registry.ts";
import type { StorageOp } from "./registry.ts";
export const STORAGE_OPS: readonly StorageOp[] = ["message", "task", "sweep", "read"];

/** Every reason a message is dropped, initialized to 0 so each series exists from the start. */
export const DROP_REASONS = [
  "bad-topic",
  "too-large",
  "bad-json",
  "unsupported-version",
  "bad-schema",
  "robot-id-mismatch",
  "unknown-task",
  "stale-task-report",
] as const;

/** Every reason a robot gives for refusing a task (`task`: none, an ordinary refusal). */
export const REFUSAL_LABELS = [
  "bad-signature",
  "wrong-robot",
  "expired",
  "replay",
  "task",
] as const;

export const MESSAGE_TYPES = ["register", "heartbeat", "status", "task-status"] as const;

/** Every task state (tasks.ts is the state machine). */
export const TASK_STATES = ALL_TASK_STATES;

/** States that end a task (the task-latency histogram's `state` label). */
export const FINAL_TASK_STATES = FINAL_STATES;

/** From 50 ms to 1 h: a task runs a command on a robot behind MQTT. */
export const TASK_LATENCY_BUCKETS = [
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
  60,
  120,
  300,
  600,
  1800,
  3600,
];

/** From 100 µs to 1 s: one SQLite transaction. */
export const STORAGE_BUCKETS = [
  0.0001,
  0.00025,
  0.0005,
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
];

/** The optional heartbeat (and register) fields the metrics use; docs/PROTOCOL.md. */
export interface RobotTelemetry {
  svidIssuedAt?: string;
  workloadApi?: "up" | "down";
  outboundQueueDepth?: number;
}

interface Snapshot {
  robots: RobotSample[] | undefined;
  taskCounts: Readonly<Record<string, number>> | undefined;
}

export class FleetMetrics implements MetricsRenderer {
  readonly registry = new Registry();
  readonly contentType = METRICS_CONTENT_TYPE;
  readonly storage: StorageTimer;
  readonly #now: () => Date;
  readonly #serial = new Serial();
  readonly #telemetry = new Map<string, RobotTelemetry>();
  readonly #taskLatency: Histogram<"state">;
  readonly #timeReads: boolean;
  readonly #readTimeoutMs: number;
  #snap: Snapshot | undefined;
  #reading: Promise<Snapshot> | undefined;

  constructor(private readonly src: FleetMetricsSources, opts: FleetMetricsOptions = {}) {
    this.#now = opts.now ?? (() => new Date());
    this.#timeReads = opts.timeSourceReads ?? true;
    this.#readTimeoutMs = opts.readTimeoutMs ?? 5000;
    const registers = [this.registry];
    // collect() runs with `this` bound to the metric: reach this object through closures.
    const snap = () => this.#snap ?? { robots: undefined, taskCounts: undefined };

    new Gauge({
      name: "k8s4r_server_info",
      help: "Always 1; the version label is the running k8s4r server's.",
      labelNames: ["version"],
      registers,
    }).set({ version: opts.version ?? "unknown" }, 1);
    new Gauge({
      name: "k8s4r_server_start_time_seconds",
      help: "When this fleet server process started (Unix time).",
      registers,
    }).set(this.#now().getTime() / 1000);

    // ---- robots ----
    new Gauge({
      name: "k8s4r_robots_known",
      help: "Robots in the registry.",
      registers,
      collect() {
        const r = snap().robots;
        if (r) this.set(r.length);
        else this.remove(); // absent rather than a made-up 0
      },
    });
    new Gauge({
      name: "k8s4r_robots_online",
      help: "Robots online (robots whose state is unknown are not counted).",
      registers,
      collect() {
        const r = snap().robots;
        if (r) this.set(r.filter((x) => x.online && !x.unknownSince).length);
        else this.remove();
      },
    });
    new Gauge({
      name: "k8s4r_robots_unknown",
      help: "Robots whose state the server cannot tell (it lost the broker).",
      registers,
      collect() {
        const r = snap().robots;
        if (r) this.set(r.filter((x) => x.unknownSince).length);
        else this.remove();
      },
    });
    const perRobot = (
      name: string,
      help: string,
      value: (r: RobotSample) => number | undefined,
    ) =>
      new Gauge({
        name,
        help,
        labelNames: ["robot"],
        registers,
        collect() {
          this.reset();
          for (const r of snap().robots ?? []) {
            const v = value(r);
            if (v !== undefined) this.set({ robot: r.id }, v);
          }
        },
      });
    const perRobotCounter = (
      name: string,
      help: string,
      value: (r: RobotSample) => number,
    ) =>
      new Counter({
        name,
        help,
        labelNames: ["robot"],
        registers,
        collect() {
          this.reset();
          for (const r of snap().robots ?? []) this.inc({ robot: r.id }, Math.max(0, value(r)));
        },
      });
    perRobot(
      "k8s4r_robot_online",
      "1 when the robot is online, 0 when offline; absent while its state is unknown.",
      (r) => r.unknownSince ? undefined : r.online ? 1 : 0,
    );
    perRobot(
      "k8s4r_robot_last_seen_timestamp_seconds",
      "When the server last heard from the robot (Unix time).",
      (r) => epochSeconds(r.lastSeen),
    );
    perRobot(
      "k8s4r_robot_svid_expiry_timestamp_seconds",
      "The notAfter of the robot's X.509 SVID, as last reported (Unix time).",
      (r) => epochSeconds(r.svidExpiresAt),
    );
    perRobot(
      "k8s4r_robot_svid_issued_timestamp_seconds",
      "The notBefore of the robot's X.509 SVID, as last reported (Unix time).",
      (r) => epochSeconds(r.svidIssuedAt ?? this.#telemetry.get(r.id)?.svidIssuedAt),
    );
    perRobotCounter(
      "k8s4r_robot_heartbeats_received_total",
      "Heartbeats received from the robot (QoS 1 duplicates not counted).",
      (r) => r.heartbeatsReceived,
    );
    perRobotCounter(
      "k8s4r_robot_heartbeats_missing_total",
      "Heartbeats that never arrived: gaps in seq within one agent process.",
      (r) => r.heartbeatsMissing,
    );
    perRobot(
      "k8s4r_robot_workload_api_up",
      "The agent's view of its SPIFFE Workload API at its last heartbeat: 1 up, 0 down.",
      (r) => {
        const up = r.workloadApiUp ?? upFrom(this.#telemetry.get(r.id)?.workloadApi);
        return up === undefined || up === null ? undefined : up ? 1 : 0;
      },
    );
    perRobot(
      "k8s4r_robot_outbound_queue_messages",
      "Messages in the agent's outbound queue at its last heartbeat.",
      (r) => r.outboundQueueDepth ?? this.#telemetry.get(r.id)?.outboundQueueDepth ?? undefined,
    );

    // ---- messages ----
    new Counter({
      name: "k8s4r_messages_received_total",
      help: "Valid robot messages received, by message type.",
      labelNames: ["type"],
      registers,
      collect() {
        this.reset();
        const s = src.stats();
        const types = new Set<string>([...MESSAGE_TYPES, ...Object.keys(s.received)]);
        for (const t of types) this.inc({ type: t }, s.received[t] ?? 0);
      },
    });
    new Counter({
      name: "k8s4r_messages_dropped_total",
      help: "Robot messages counted and dropped, by reason.",
      labelNames: ["reason"],
      registers,
      collect() {
        this.reset();
        const s = src.stats();
        const counts: Record<string, number> = { ...s.dropped };
        counts["unknown-task"] = (counts["unknown-task"] ?? 0) + (s.unknownTaskReports ?? 0);
        counts["stale-task-report"] = (counts["stale-task-report"] ?? 0) +
          (s.staleTaskReports ?? 0);
        const reasons = new Set<string>([...DROP_REASONS, ...Object.keys(counts)]);
        for (const r of reasons) this.inc({ reason: r }, counts[r] ?? 0);
      },
    });

    // ---- tasks ----
    new Gauge({
      name: "k8s4r_tasks",
      help: "Tasks in the registry, by state.",
      labelNames: ["state"],
      registers,
      collect() {
        this.reset();
        const counts = snap().taskCounts;
        if (!counts) return; // a failed read: counted in k8s4r_storage_errors_total{op="read"}
        const states = new Set<string>([...TASK_STATES, ...Object.keys(counts)]);
        for (const s of states) this.set({ state: s }, counts[s] ?? 0);
      },
    });
    new Counter({
      name: "k8s4r_tasks_dispatched_total",
      help: "Task messages published to robots and acknowledged by the broker.",
      registers,
      collect() {
        this.reset();
        this.inc(src.stats().tasksDispatched);
      },
    });
    new Counter({
      name: "k8s4r_task_publish_errors_total",
      help: "Task messages the broker did not acknowledge (sent again later).",
      registers,
      collect() {
        this.reset();
        this.inc(src.stats().publishErrors);
      },
    });
    new Counter({
      name: "k8s4r_task_refusals_total",
      help:
        "Task reports of state refused, by reason; bad-signature, wrong-robot and replay never change a task.",
      labelNames: ["reason"],
      registers,
      collect() {
        this.reset();
        const counts = src.stats().refusals ?? {};
        const reasons = new Set<string>([...REFUSAL_LABELS, ...Object.keys(counts)]);
        for (const r of reasons) this.inc({ reason: r }, counts[r] ?? 0);
      },
    });
    new Counter({
      name: "k8s4r_task_sign_errors_total",
      help: "Tasks and cancels that could not be signed with the server's SVID, hence not sent.",
      registers,
      collect() {
        this.reset();
        this.inc(src.stats().signErrors ?? 0);
      },
    });
    this.#taskLatency = new Histogram({
      name: "k8s4r_task_latency_seconds",
      help: "From a task's creation to its final state, by final state.",
      labelNames: ["state"],
      buckets: TASK_LATENCY_BUCKETS,
      registers,
    });
    for (const s of FINAL_TASK_STATES) this.#taskLatency.zero({ state: s });

    // ---- MQTT ----
    new Gauge({
      name: "k8s4r_mqtt_connected",
      help: "1 while the server is connected and subscribed to the broker, else 0.",
      registers,
      collect() {
        this.set(src.mqtt().connected ? 1 : 0);
      },
    });
    new Counter({
      name: "k8s4r_mqtt_connects_total",
      help: "Successful connections to the broker since the server started.",
      registers,
      collect() {
        this.reset();
        this.inc(src.mqtt().connects);
      },
    });

    // ---- trust bundle ----
    const newest = () => newestCa(this.src.trustBundle?.());
    new Gauge({
      name: "k8s4r_trust_bundle_expiry_timestamp_seconds",
      help: "The latest notAfter among the trust bundle's CAs: when the bundle stops validating.",
      registers,
      collect() {
        const ca = newest();
        if (ca) this.set(ca.notAfter.getTime() / 1000);
        else this.remove(); // no bundle known: absent, never a 0 timestamp
      },
    });
    new Gauge({
      name: "k8s4r_trust_bundle_issued_timestamp_seconds",
      help: "The notBefore of the trust bundle's CA that expires last (Unix time).",
      registers,
      collect() {
        const ca = newest();
        if (ca) this.set(ca.notBefore.getTime() / 1000);
        else this.remove();
      },
    });

    // ---- storage ----
    const duration = new Histogram({
      name: "k8s4r_storage_operation_duration_seconds",
      help: "Registry (SQLite) operations, by what they were for.",
      labelNames: ["op"],
      buckets: STORAGE_BUCKETS,
      registers,
    });
    const errors = new Counter({
      name: "k8s4r_storage_errors_total",
      help: "Registry operations that failed, by what they were for (all but read write).",
      labelNames: ["op"],
      registers,
    });
    for (const op of STORAGE_OPS) {
      duration.zero({ op });
      errors.inc({ op }, 0);
    }
    this.storage = new StorageTimer(duration, errors);
  }

  /**
   * Records the agent-side values a heartbeat or register carries, for robots whose source
   * record does not hold them. Call it with the validated message; unknown fields are ignored.
   */
  recordRobotTelemetry(robotId: string, msg: RobotTelemetry): void {
    const prev = this.#telemetry.get(robotId) ?? {};
    const next: RobotTelemetry = { ...prev };
    if (msg.svidIssuedAt !== undefined) next.svidIssuedAt = msg.svidIssuedAt;
    if (msg.workloadApi !== undefined) next.workloadApi = msg.workloadApi;
    if (msg.outboundQueueDepth !== undefined) next.outboundQueueDepth = msg.outboundQueueDepth;
    this.#telemetry.set(robotId, next);
  }

  /** Observes a task that reached a final state (call when the transition changed it). */
  taskFinished(task: { state: string; createdAt: string; finishedAt?: string | null }): void {
    if (!(FINAL_TASK_STATES as readonly string[]).includes(task.state)) return;
    const created = Date.parse(task.createdAt);
    const end = task.finishedAt ? Date.parse(task.finishedAt) : this.#now().getTime();
    if (!Number.isFinite(created) || !Number.isFinite(end)) return;
    this.#taskLatency.observe({ state: task.state }, Math.max(0, (end - created) / 1000));
  }

  /** The text format, from one snapshot of the sources. */
  render(): Promise<string> {
    return this.#serial.run(async () => {
      this.#snap = await this.#take();
      try {
        return await this.registry.metrics();
      } finally {
        this.#snap = undefined;
      }
    });
  }

  /** One read of the sources, bounded; a read still running from a timed-out scrape is reused. */
  async #take(): Promise<Snapshot> {
    this.#reading ??= this.#read().finally(() => (this.#reading = undefined));
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<Snapshot>((resolve) => {
      timer = setTimeout(
        () => resolve({ robots: undefined, taskCounts: undefined }),
        this.#readTimeoutMs,
      );
    });
    try {
      return await Promise.race([this.#reading, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  async #read(): Promise<Snapshot> {
    const one = async <T>(fn: () => MaybePromise<T>): Promise<T | undefined> => {
      try {
        return this.#timeReads ? await this.storage.timeAsync("read", fn) : await fn();
      } catch {
        return undefined; // counted in k8s4r_storage_errors_total{op="read"}
      }
    };
    const robots = await one(async () => Array.from(await this.src.robots()));
    const taskCounts = await one(() => this.src.taskCounts());
    return { robots, taskCounts };
  }
}

function upFrom(v: "up" | "down" | undefined): boolean | undefined {
  return v === undefined ? undefined : v === "up";
}

function newestCa(cas: readonly CaValidity[] | undefined): CaValidity | undefined {
  let best: CaValidity | undefined;
  for (const ca of cas ?? []) {
    if (!best || ca.notAfter.getTime() > best.notAfter.getTime()) best = ca;
  }
  return best;
}

/** Times registry operations and counts their failures. */
export class StorageTimer {
  constructor(
    private readonly duration: Histogram<"op">,
    private readonly errors: Counter<"op">,
  ) {}

  /** Runs `fn` (synchronous: node:sqlite is), observes its duration, counts a throw, rethrows. */
  time<T>(op: StorageOp, fn: () => T): T {
    const t0 = performance.now();
    let failed = true;
    try {
      const r = fn();
      failed = false;
      return r;
    } finally {
      this.observe(op, (performance.now() - t0) / 1000, failed);
    }
  }

  /** Like `time`, for an async operation (or one that may be). */
  async timeAsync<T>(op: StorageOp, fn: () => T | Promise<T>): Promise<T> {
    const t0 = performance.now();
    let failed = true;
    try {
      const r = await fn();
      failed = false;
      return r;
    } finally {
      this.observe(op, (performance.now() - t0) / 1000, failed);
    }
  }

  /** For callers that time an operation themselves. */
  observe(op: StorageOp, seconds: number, failed = false): void {
    this.duration.observe({ op }, seconds);
    if (failed) this.errors.inc({ op });
  }
}

/**
 * The CAs of a PEM trust bundle file (e.g. the exported `spire-ca.crt`), for
 * `FleetMetricsSources.trustBundle`. The file is read again only when its mtime or size
 * changes; an unreadable or malformed file yields undefined (no bundle series), so a scrape
 * never fails on it.
 */
export function trustBundleFile(path: string): () => readonly CaValidity[] | undefined {
  let key = "";
  let cached: readonly CaValidity[] | undefined;
  return () => {
    try {
      const st = Deno.statSync(path);
      const k = `${st.mtime?.getTime()}:${st.size}`;
      if (k !== key) {
        cached = parseBundlePem(Deno.readTextFileSync(path));
        key = k;
      }
      return cached;
    } catch {
      key = "";
      cached = undefined;
      return undefined;
    }
  };
}

/** CA validity periods of every CERTIFICATE block in a PEM text. Throws on malformed PEM. */
export function parseBundlePem(pem: string): CaValidity[] {
  return decodePemOfType(pem, "CERTIFICATE", "trust bundle").map((der) => {
    const info = parseCertDer(der);
    return { notBefore: info.notBefore, notAfter: info.notAfter };
  });
}
