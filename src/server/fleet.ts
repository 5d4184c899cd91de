/**
 * The fleet server's logic, without any network: it decodes robot messages, keeps the registry
 * up to date, creates tasks and dispatches them through a `Publisher`. `FleetServer`
 * (fleet_server.ts) wires it to MQTT and HTTP; tests drive it directly with a fake publisher.
 */
import {
  decodeUp,
  type DropReason,
  encode,
  PROTOCOL_VERSION,
  type TaskMessage,
  type UpMessage,
} from "../mqtt/messages.ts";
import { downTopic, isRobotId } from "../fleet/topics.ts";
import type { Registry, RobotRecord, TaskRecord } from "./registry.ts";
import { needsDispatch } from "./tasks.ts";

/** What the fleet needs from an MQTT client. */
export interface Publisher {
  /** Publishes at QoS 1 (not retained); resolves on PUBACK. */
  publish(topic: string, payload: Uint8Array): Promise<void>;
  connected(): boolean;
}

export interface Logger {
  info(msg: string): void;
  warn(msg: string): void;
}

export const silentLogger: Logger = { info() {}, warn() {} };

export interface FleetOptions {
  /** Used when a robot did not announce its own interval. Default 10 s. */
  heartbeatIntervalSeconds?: number;
  /** Missed heartbeats before a robot is declared offline. Default 3. */
  missedHeartbeats?: number;
  /** A task not delivered within this is expired. Default 3600 s. */
  defaultTaskTtlSeconds?: number;
  /** Grace after a task's own timeout before an unreported accepted/running task is failed. */
  resultGraceSeconds?: number;
  now?: () => Date;
  logger?: Logger;
  newId?: () => string;
}

export interface TaskRequest {
  command: string[];
  env: Record<string, string>;
  cwd?: string;
  timeoutSeconds: number;
  ttlSeconds?: number;
}

export class NotFoundError extends Error {}

export interface FleetStats {
  received: Record<string, number>;
  dropped: Record<DropReason, number>;
  droppedTotal: number;
  tasksDispatched: number;
  publishErrors: number;
  staleTaskReports: number;
  unknownTaskReports: number;
}

export class FleetService {
  readonly stats: FleetStats = {
    received: { register: 0, heartbeat: 0, status: 0, "task-status": 0 },
    dropped: {
      "bad-topic": 0,
      "too-large": 0,
      "bad-json": 0,
      "unsupported-version": 0,
      "bad-schema": 0,
      "robot-id-mismatch": 0,
    },
    droppedTotal: 0,
    tasksDispatched: 0,
    publishErrors: 0,
    staleTaskReports: 0,
    unknownTaskReports: 0,
  };
  private readonly hbDefault: number;
  private readonly missed: number;
  private readonly ttlDefault: number;
  private readonly grace: number;
  private readonly now: () => Date;
  private readonly log: Logger;
  private readonly newId: () => string;
  /** Dispatches in flight, so that a burst of triggers publishes each task once. */
  private readonly inFlight = new Set<string>();
  private readonly pending = new Set<Promise<void>>();

  constructor(
    readonly registry: Registry,
    private readonly publisher: Publisher,
    opts: FleetOptions = {},
  ) {
    this.hbDefault = opts.heartbeatIntervalSeconds ?? 10;
    this.missed = opts.missedHeartbeats ?? 3;
    this.ttlDefault = opts.defaultTaskTtlSeconds ?? 3600;
    this.grace = opts.resultGraceSeconds ?? 60;
    this.now = opts.now ?? (() => new Date());
    this.log = opts.logger ?? silentLogger;
    this.newId = opts.newId ?? (() => crypto.randomUUID());
  }

  private nowIso(): string {
    return this.now().toISOString();
  }

  /**
   * Handles one received MQTT message. Never throws: a bad message is counted per reason and
   * dropped. Synchronous registry writes happen before this returns, so the caller's PUBACK
   * follows a durable write.
   */
  handleMessage(topic: string, payload: Uint8Array): { ok: boolean; reason?: DropReason } {
    const d = decodeUp(topic, payload);
    if (!d.ok) {
      this.stats.dropped[d.reason]++;
      this.stats.droppedTotal++;
      this.log.warn(`dropped message on ${topic}: ${d.reason}: ${d.error}`);
      return { ok: false, reason: d.reason };
    }
    this.stats.received[d.message.type] = (this.stats.received[d.message.type] ?? 0) + 1;
    try {
      this.registry.transaction(() => this.apply(d.robotId, d.message));
    } catch (err) {
      // A registry failure must not take the server down; the message is lost, and logged.
      this.log.warn(
        `failed to apply ${d.message.type} from ${d.robotId}: ${(err as Error).message}`,
      );
    }
    return { ok: true };
  }

  private apply(robotId: string, msg: UpMessage): void {
    const at = this.nowIso();
    const reg = this.registry;
    switch (msg.type) {
      case "register": {
        reg.recordRegister(robotId, at, msg);
        reg.setOnline(robotId, true, null);
        this.log.info(`robot ${robotId} registered (agent ${msg.agentVersion})`);
        // The agent (re)started: anything not yet accepted is sent again (it dedupes by id).
        this.dispatchFor(robotId);
        return;
      }
      case "heartbeat": {
        reg.recordHeartbeat(robotId, at, msg);
        if (reg.setOnline(robotId, true, null)) {
          this.log.info(`robot ${robotId} is back (heartbeat)`);
          this.dispatchFor(robotId);
        }
        return;
      }
      case "status": {
        reg.touchRobot(robotId, at);
        const last = reg.lastStatusTs(robotId);
        // Retained status messages are replayed on every subscribe: apply only newer ones.
        if (last !== null && Date.parse(msg.ts) <= Date.parse(last)) return;
        reg.setLastStatusTs(robotId, msg.ts);
        const changed = reg.setOnline(
          robotId,
          msg.status === "online",
          msg.reason ?? (msg.status === "offline" ? "status offline" : null),
        );
        if (changed) this.log.info(`robot ${robotId} is ${msg.status}`);
        if (msg.status === "online") this.dispatchFor(robotId);
        return;
      }
      case "task-status": {
        reg.touchRobot(robotId, at);
        const task = reg.getTask(msg.taskId);
        if (!task || task.robotId !== robotId) {
          // Unknown, or another robot's task id: a robot may only report on its own tasks.
          this.stats.unknownTaskReports++;
          this.log.warn(`robot ${robotId} reported on unknown task ${msg.taskId}`);
          return;
        }
        const r = reg.applyTaskEvent(msg.taskId, msg.state, at, {
          exitCode: msg.exitCode,
          stdout: msg.stdout,
          stderr: msg.stderr,
          error: msg.error,
        });
        if (r?.ignored) this.stats.staleTaskReports++;
        return;
      }
    }
  }

  /** Validates and stores a new task; dispatches it at once if the robot is online. */
  createTask(robotId: string, req: TaskRequest): TaskRecord {
    if (!isRobotId(robotId)) throw new NotFoundError(`unknown robot ${robotId}`);
    const robot = this.registry.getRobot(robotId);
    if (!robot) throw new NotFoundError(`unknown robot ${robotId}`);
    const now = this.now();
    const ttl = req.ttlSeconds ?? this.ttlDefault;
    const task = this.registry.createTask({
      id: this.newId(),
      robotId,
      command: req.command,
      env: req.env,
      cwd: req.cwd,
      timeoutSeconds: req.timeoutSeconds,
      createdAt: now.toISOString(),
      expiresAt: new Date(now.getTime() + ttl * 1000).toISOString(),
    });
    if (robot.online) this.dispatchTask(task);
    return task;
  }

  /** Sends every undelivered task of one robot. */
  dispatchFor(robotId: string): void {
    for (const t of this.registry.tasksInStates(["pending", "dispatched"], robotId)) {
      this.dispatchTask(t);
    }
  }

  /** After (re)connecting to the broker: send what online robots are owed. */
  dispatchAllOnline(): void {
    for (const r of this.registry.onlineRobots()) this.dispatchFor(r.id);
  }

  private dispatchTask(task: TaskRecord): void {
    if (!needsDispatch(task.state) || this.inFlight.has(task.id)) return;
    if (Date.parse(task.expiresAt) <= this.now().getTime()) return; // the sweeper expires it
    if (!this.publisher.connected()) return; // sent again on reconnect
    const msg: TaskMessage = {
      v: PROTOCOL_VERSION,
      type: "task",
      robotId: task.robotId,
      ts: this.nowIso(),
      id: task.id,
      command: task.command,
      env: task.env,
      timeoutSeconds: task.timeoutSeconds,
      createdAt: task.createdAt,
      expiresAt: task.expiresAt,
    };
    if (task.cwd) msg.cwd = task.cwd;
    this.inFlight.add(task.id);
    const p = this.publisher.publish(downTopic(task.robotId, "task"), encode(msg)).then(
      () => {
        this.stats.tasksDispatched++;
        this.registry.applyTaskEvent(task.id, "dispatch", this.nowIso());
      },
      (err) => {
        this.stats.publishErrors++;
        this.log.warn(`could not publish task ${task.id}: ${(err as Error).message}`);
      },
    ).catch((err) => {
      this.log.warn(`task ${task.id}: ${(err as Error).message}`);
    }).finally(() => {
      this.inFlight.delete(task.id);
      this.pending.delete(p);
    });
    this.pending.add(p);
  }

  /** Resolves when all dispatches in flight have settled (tests, shutdown). */
  async settled(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
  }

  /**
   * Periodic housekeeping: robots silent for `missed` heartbeat intervals go offline; tasks
   * never delivered before their TTL expire; accepted/running tasks with no result long after
   * their timeout fail.
   */
  sweep(): { offline: string[]; expired: string[]; lost: string[] } {
    const now = this.now().getTime();
    const at = this.nowIso();
    const offline: string[] = [];
    for (const r of this.registry.onlineRobots()) {
      const interval = r.heartbeatIntervalSeconds ?? this.hbDefault;
      if (now - Date.parse(r.lastSeen) > this.missed * interval * 1000) {
        if (this.registry.setOnline(r.id, false, `missed ${this.missed} heartbeats`)) {
          offline.push(r.id);
          this.log.info(`robot ${r.id} is offline (missed ${this.missed} heartbeats)`);
        }
      }
    }
    const expired: string[] = [];
    for (const t of this.registry.tasksInStates(["pending", "dispatched"])) {
      if (Date.parse(t.expiresAt) <= now && !this.inFlight.has(t.id)) {
        const r = this.registry.applyTaskEvent(t.id, "expire", at, {
          error: "not delivered to the robot before its TTL",
        });
        if (r?.changed) expired.push(t.id);
      }
    }
    const lost: string[] = [];
    for (const t of this.registry.tasksInStates(["accepted", "running"])) {
      const since = Date.parse(t.startedAt ?? t.acceptedAt ?? t.updatedAt);
      if (now - since > (t.timeoutSeconds + this.grace) * 1000) {
        const r = this.registry.applyTaskEvent(t.id, "lost", at, {
          error: `no result from robot ${t.robotId} within timeout + ${this.grace}s`,
        });
        if (r?.changed) lost.push(t.id);
      }
    }
    return { offline, expired, lost };
  }

  robotView(r: RobotRecord) {
    return {
      id: r.id,
      online: r.online,
      spiffeId: r.spiffeId,
      firstSeen: r.firstSeen,
      lastSeen: r.lastSeen,
      offlineReason: r.offlineReason,
      svidExpiresAt: r.svidExpiresAt,
      agentVersion: r.agentVersion,
      heartbeatIntervalSeconds: r.heartbeatIntervalSeconds ?? this.hbDefault,
      heartbeats: { received: r.heartbeatsReceived, missing: r.heartbeatsMissing },
      device: r.device,
    };
  }
}
