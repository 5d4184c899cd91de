/**
 * The agent's own metrics: its loopback `/metrics` page, and the few values its heartbeat
 * carries to the fleet server (docs/METRICS.md, "Why both").
 *
 * Robots usually cannot be scraped across a fleet (NAT, cellular links, no inbound port), so the
 * heartbeat, which already travels the authenticated mTLS MQTT session, carries what the fleet's
 * alerts need (`heartbeatFields()`), and the fleet server re-exposes it per robot. The loopback
 * page serves a collector on the robot itself (or devenv's Prometheus on one host), and keeps
 * answering exactly when heartbeats cannot: while the broker is unreachable.
 *
 * Like `FleetMetrics`, it reads small source interfaces at scrape time; the only event it must
 * be told of is an SVID update (`observeSvid()`), to time rotations.
 */
import {
  Counter,
  epochSeconds,
  Gauge,
  METRICS_CONTENT_TYPE,
  type MetricsRenderer,
  Registry,
  Serial,
} from "../metrics/mod.ts";

/** The validity of one certificate. */
export interface Validity {
  notBefore: Date;
  notAfter: Date;
}

/** The current X.509 SVID (`X509Svid` fits: it has notBefore, notAfter). */
export interface SvidInfo extends Validity {
  /** Tells two SVIDs with equal validity apart; e.g. the leaf's serial number. */
  serial?: string;
}

export interface AgentMetricsSources {
  robotId: string;
  version: string;
  /** The SVID in use; undefined before the first one. */
  svid(): SvidInfo | undefined;
  /** The CAs of the robot's trust bundle (its own trust domain). */
  trustBundle?(): readonly Validity[] | undefined;
  /** True while the Workload API stream is healthy (`X509Source.lastError === undefined`). */
  workloadApiUp(): boolean;
  broker(): { connected: boolean; connects: number };
  /** Messages held for the broker and not yet acknowledged. */
  outboundQueueDepth(): number;
  /** Optional counters of the agent (`RobotAgent.stats`). */
  counters?(): AgentCounters;
}

export interface AgentCounters {
  heartbeats?: number;
  tasks?: number;
  malformed?: number;
  denied?: number;
}

export interface AgentMetricsOptions {
  now?: () => Date;
}

/**
 * The optional heartbeat fields this module fills (proposed for docs/PROTOCOL.md; the names
 * are the fleet server's `RobotTelemetry`).
 */
export interface HeartbeatTelemetry {
  svidIssuedAt?: string;
  workloadApi: "up" | "down";
  outboundQueueDepth: number;
}

export class AgentMetrics implements MetricsRenderer {
  readonly registry = new Registry();
  readonly contentType = METRICS_CONTENT_TYPE;
  readonly #now: () => Date;
  readonly #serial = new Serial();
  #svidKey: string | undefined;
  #lastRotation: Date | undefined;
  #rotations = 0;

  constructor(private readonly src: AgentMetricsSources, opts: AgentMetricsOptions = {}) {
    this.#now = opts.now ?? (() => new Date());
    const registers = [this.registry];
    // collect() runs with `this` bound to the metric: reach this object through closures.
    const svid = () => this.#svid();
    const observe = () => this.observeSvid();
    const lastRotation = () => this.#lastRotation;
    const rotations = () => this.#rotations;

    new Gauge({
      name: "k8s4r_agent_info",
      help: "Always 1; the labels are the robot id and the running agent's version.",
      labelNames: ["robot", "version"],
      registers,
    }).set({ robot: src.robotId, version: src.version }, 1);
    new Gauge({
      name: "k8s4r_agent_start_time_seconds",
      help: "When this agent process started (Unix time).",
      registers,
    }).set(this.#now().getTime() / 1000);

    const fromSvid = (name: string, help: string, v: (s: SvidInfo) => Date) =>
      new Gauge({
        name,
        help,
        registers,
        collect() {
          const s = svid();
          if (s) this.set(v(s).getTime() / 1000);
          else this.remove();
        },
      });
    fromSvid(
      "k8s4r_agent_svid_expiry_timestamp_seconds",
      "The notAfter of the agent's current X.509 SVID (Unix time).",
      (s) => s.notAfter,
    );
    fromSvid(
      "k8s4r_agent_svid_issued_timestamp_seconds",
      "The notBefore of the agent's current X.509 SVID (Unix time).",
      (s) => s.notBefore,
    );
    new Gauge({
      name: "k8s4r_agent_svid_last_rotation_timestamp_seconds",
      help: "When the agent took up its current SVID (its first one counts); age = time() - this.",
      registers,
      collect() {
        observe();
        const at = lastRotation();
        if (at) this.set(at.getTime() / 1000);
        else this.remove();
      },
    });
    new Counter({
      name: "k8s4r_agent_svid_rotations_total",
      help: "SVIDs taken up after the first one.",
      registers,
      collect() {
        observe();
        this.reset();
        this.inc(rotations());
      },
    });
    new Gauge({
      name: "k8s4r_agent_trust_bundle_expiry_timestamp_seconds",
      help: "The latest notAfter among the robot's trust bundle CAs (Unix time).",
      registers,
      collect() {
        let latest: number | undefined;
        for (const ca of src.trustBundle?.() ?? []) {
          const t = epochSeconds(ca.notAfter);
          if (t !== undefined && (latest === undefined || t > latest)) latest = t;
        }
        if (latest !== undefined) this.set(latest);
        else this.remove();
      },
    });
    new Gauge({
      name: "k8s4r_agent_workload_api_up",
      help: "1 while the agent's SPIFFE Workload API stream is healthy, else 0.",
      registers,
      collect() {
        this.set(src.workloadApiUp() ? 1 : 0);
      },
    });
    new Gauge({
      name: "k8s4r_agent_broker_connected",
      help: "1 while the agent is connected to the MQTT broker, else 0.",
      registers,
      collect() {
        this.set(src.broker().connected ? 1 : 0);
      },
    });
    new Counter({
      name: "k8s4r_agent_broker_connects_total",
      help: "Successful connections to the broker since the agent started.",
      registers,
      collect() {
        this.reset();
        this.inc(src.broker().connects);
      },
    });
    new Gauge({
      name: "k8s4r_agent_outbound_queue_messages",
      help: "Messages held for the broker and not yet acknowledged.",
      registers,
      collect() {
        this.set(Math.max(0, src.outboundQueueDepth()));
      },
    });
    const counter = (name: string, help: string, key: keyof AgentCounters) =>
      new Counter({
        name,
        help,
        registers,
        collect() {
          this.reset();
          this.inc(Math.max(0, src.counters?.()[key] ?? 0));
        },
      });
    counter("k8s4r_agent_heartbeats_sent_total", "Heartbeats the agent published.", "heartbeats");
    counter("k8s4r_agent_tasks_received_total", "Task messages received.", "tasks");
    counter(
      "k8s4r_agent_malformed_messages_total",
      "Messages from the broker counted and dropped as malformed.",
      "malformed",
    );
    counter(
      "k8s4r_agent_publishes_denied_total",
      "Publishes the broker refused (PUBACK with an error reason code).",
      "denied",
    );
  }

  #svid(): SvidInfo | undefined {
    try {
      return this.src.svid();
    } catch {
      return undefined;
    }
  }

  /**
   * Notes the SVID in use; a different one than last time is a rotation, timed now. Call it
   * from the X509Source's update listener (it fires for bundle changes too: those are not
   * counted). Scrapes call it as well, so a missed call only delays the timestamp.
   */
  observeSvid(): void {
    const s = this.#svid();
    if (!s) return;
    const key = `${s.serial ?? ""}|${s.notBefore.getTime()}|${s.notAfter.getTime()}`;
    if (key === this.#svidKey) return;
    if (this.#svidKey !== undefined) this.#rotations++;
    this.#svidKey = key;
    this.#lastRotation = this.#now();
  }

  /** The telemetry fields to add to each heartbeat (and `svidIssuedAt` to each register). */
  heartbeatFields(): HeartbeatTelemetry {
    const s = this.#svid();
    const f: HeartbeatTelemetry = {
      workloadApi: this.src.workloadApiUp() ? "up" : "down",
      outboundQueueDepth: Math.max(0, Math.floor(this.src.outboundQueueDepth())),
    };
    if (s) f.svidIssuedAt = s.notBefore.toISOString();
    return f;
  }

  render(): Promise<string> {
    return this.#serial.run(() => this.registry.metrics());
  }
}
