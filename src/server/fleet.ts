/**
 * The fleet server's logic, without any network: it decodes robot messages, keeps the registry
 * up to date, creates tasks and dispatches them through a `Publisher`. `FleetServer`
 * (fleet_server.ts) wires it to MQTT and HTTP; tests drive it directly with a fake publisher.
 */
import {
  type CancelMessage,
  decodeUp,
  type DownMessage,
  type DropReason,
  encode,
  PROTOCOL_VERSION,
  type StatusMessage,
  type TaskMessage,
  type UpMessage,
} from "../mqtt/messages.ts";
import { downTopic, isRobotId } from "../fleet/topics.ts";
import {
  compareStatusOrder,
  type Registry,
  type RegistryTx,
  type RobotRecord,
  type StatusOrder,
  type TaskRecord,
} from "./registry.ts";
import { isFinal, needsCancel, needsDispatch } from "./tasks.ts";

/**
 * Turns a server -> robot message into the exact MQTT payload. The fleet server signs tasks and
 * cancels with its own X.509 SVID (docs/PROTOCOL.md, "Signed tasks and cancels"); `sign` may
 * throw (no SVID, a payload over the limit), and the message is then not sent.
 */
export interface DownSigner {
  sign(msg: DownMessage): Uint8Array;
}

/** Plain JSON, no signature: unit tests, and robots that do not require signatures. */
export const UNSIGNED: DownSigner = { sign: (msg) => encode(msg) };

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
  /** Start with the broker link down (`FleetServer`: robots are unknown until subscribed). */
  startDisconnected?: boolean;
  /** Signs every task and cancel. Default UNSIGNED. */
  signer?: DownSigner;
  /**
   * The server's own probe topic (`serverProbeTopic`): `FleetServer` publishes the time to it
   * every half second and subscribes to it, so each echo proves that the broker delivered
   * everything queued before it. Without it (unit tests) the wall clock is trusted.
   */
  probeTopic?: string;
  /** No echo for this long: the broker is not delivering (frozen, overloaded). Default 2000. */
  probeStallMs?: number;
}

export interface TaskRequest {
  command: string[];
  env: Record<string, string>;
  cwd?: string;
  timeoutSeconds: number;
  ttlSeconds?: number;
}

export class NotFoundError extends Error {}

/** The request conflicts with the task's state (e.g. cancelling a finished task). */
export class ConflictError extends Error {}

export interface CancelResult {
  task: TaskRecord;
  /**
   * `withdrawn`: it was pending and nobody was publishing it: cancelled at once, never sent.
   * `cancelling`: the robot may have it: a signed cancel went out, and the robot's report ends it.
   * `already`: a cancel was requested before; it is sent again.
   */
  outcome: "withdrawn" | "cancelling" | "already";
}

export interface FleetStats {
  received: Record<string, number>;
  dropped: Record<DropReason, number>;
  droppedTotal: number;
  tasksDispatched: number;
  /** Cancels acknowledged by the broker (a task's cancel may be sent more than once). */
  cancelsSent: number;
  /** Tasks or cancels that could not be signed, hence not sent. */
  signErrors: number;
  publishErrors: number;
  staleTaskReports: number;
  unknownTaskReports: number;
  /** Retained statuses replayed on subscribe (equal to the last one applied): no-ops. */
  statusReplays: number;
  /** Statuses older than the last one applied, or of another boot (a will of a gone process). */
  staleStatuses: number;
  /** Registers of an older connection of the current boot (redelivered late): not applied. */
  staleRegisters: number;
  /** Messages whose registry write failed: not acknowledged, so the broker delivers them again. */
  applyErrors: number;
  /** Registry commits for received messages (messages / batches = messages per fsync). */
  batches: number;
}

/** One received MQTT message. */
export interface Incoming {
  topic: string;
  payload: Uint8Array;
}

export type Outcome = { ok: true } | { ok: false; reason: DropReason };

export interface BatchResult {
  /**
   * The first `acked` messages are settled (applied and committed, or malformed and dropped):
   * they may be acknowledged. The others were not applied and must NOT be acknowledged.
   */
  acked: number;
  /** Outcome of each settled message. */
  results: Outcome[];
  /** Why message `acked` could not be applied (a registry error). */
  error?: string;
}

/** The broker link as the robots' state depends on it. */
export interface LinkState {
  connected: boolean;
  /** Since when connected (subscribed), or since when disconnected. */
  since: string;
  /** Connected and the broker echoed a probe within `probeStallMs`. */
  delivering: boolean;
  /** Everything the broker queued for us before this time has been received. */
  confirmedAt: string;
}

/** What the server can say about a robot: `unknown` while it cannot hear from the fleet. */
export type RobotState = "online" | "offline" | "unknown";

/** Runs after the commit: logs, counters, dispatches (which track themselves). */
type Effect = () => void;

/** A decoded item that is the server's own probe echo, not a robot's message. */
const PROBE = Symbol("probe");

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
    cancelsSent: 0,
    signErrors: 0,
    publishErrors: 0,
    staleTaskReports: 0,
    unknownTaskReports: 0,
    statusReplays: 0,
    staleStatuses: 0,
    staleRegisters: 0,
    applyErrors: 0,
    batches: 0,
  };
  private readonly hbDefault: number;
  private readonly missed: number;
  private readonly ttlDefault: number;
  private readonly grace: number;
  private readonly now: () => Date;
  private readonly log: Logger;
  private readonly newId: () => string;
  /**
   * Dispatches in flight, so that a burst of triggers publishes each task once; also held by a
   * withdraw while it is written, so that no publish of that task starts meanwhile.
   */
  private readonly inFlight = new Set<string>();
  /** Cancels in flight, likewise. */
  private readonly cancelsInFlight = new Set<string>();
  /**
   * Tasks (and cancels) asked for again while in flight: sent once more when the slot is freed.
   * The robot may have subscribed after that publish reached the broker (no session kept while
   * away, or a session the broker lost), so the broker acknowledged it to us and delivered it
   * to nobody; the robot's register is what asks again. It dedupes by task id.
   */
  private readonly againTasks = new Set<string>();
  private readonly againCancels = new Set<string>();
  private readonly signer: DownSigner;
  private readonly pending = new Set<Promise<void>>();
  /** Up by default (unit tests); `FleetServer` sets it down until it is subscribed. */
  private link: { up: boolean; since: number };
  private readonly probeTopic?: string;
  private readonly probeStallMs: number;
  /** The send time of the newest probe echoed by the broker (see `FleetOptions.probeTopic`). */
  private confirmed: number;

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
    this.link = { up: !opts.startDisconnected, since: this.now().getTime() };
    this.signer = opts.signer ?? UNSIGNED;
    this.probeTopic = opts.probeTopic;
    this.probeStallMs = opts.probeStallMs ?? 2000;
    this.confirmed = this.link.since;
  }

  /**
   * The time up to which the fleet has been heard: with probes, the send time of the newest
   * echo (a heartbeat sent before it would have been delivered before it), else now. A frozen
   * broker or a server that was itself frozen (SIGSTOP, a stalled event loop) therefore never
   * turns its own silence into "missed heartbeats".
   */
  private heardUntil(now: number): number {
    return this.probeTopic === undefined ? now : Math.min(now, this.confirmed);
  }

  /** Connected, but no probe came back for `probeStallMs`: the broker is not delivering. */
  private stalled(now: number): boolean {
    return this.probeTopic !== undefined && this.link.up &&
      now - Math.max(this.confirmed, this.link.since) > this.probeStallMs;
  }

  /** A probe came back: `payload` is the decimal milliseconds it was sent at. */
  private probeEchoed(payload: Uint8Array): void {
    const sent = Number(new TextDecoder().decode(payload));
    // Ours (only the server may write under k8s4r/server/); never trust a time in the future.
    if (!Number.isFinite(sent) || sent > this.now().getTime()) return;
    if (sent > this.confirmed) this.confirmed = sent;
  }

  private nowIso(): string {
    return this.now().toISOString();
  }

  /**
   * The broker connection is lost (or not made yet): from now on no robot's state is known,
   * and the sweeper marks nobody offline for missed heartbeats.
   */
  linkDown(): void {
    if (!this.link.up) return;
    this.link = { up: false, since: this.now().getTime() };
    this.log.warn(`robot states unknown from ${this.nowIso()} (not connected to the broker)`);
  }

  /**
   * Connected and subscribed again: queued messages and retained statuses are applied as they
   * arrive, and heartbeat-based offline detection restarts with a full grace from now.
   */
  linkUp(): void {
    this.link = { up: true, since: this.now().getTime() };
  }

  linkState(): LinkState {
    const now = this.now().getTime();
    return {
      connected: this.link.up,
      since: new Date(this.link.since).toISOString(),
      delivering: this.link.up && !this.stalled(now),
      confirmedAt: new Date(
        this.probeTopic === undefined ? (this.link.up ? now : this.link.since) : this.confirmed,
      ).toISOString(),
    };
  }

  /**
   * Handles one received MQTT message in its own transaction. Never throws: a bad message is
   * counted per reason and dropped (`{ok: false, reason}`); a registry error returns
   * `{ok: false, error}` and nothing of the message is written.
   */
  async handleMessage(
    topic: string,
    payload: Uint8Array,
  ): Promise<{ ok: boolean; reason?: DropReason; error?: string }> {
    const r = await this.handleBatch([{ topic, payload }]);
    if (r.acked === 0) return { ok: false, error: r.error };
    return r.results[0];
  }

  /**
   * Handles messages in arrival order, all in ONE registry transaction (one commit, one
   * fsync). Stops at the first message whose write fails: it and the ones after it are not
   * applied, so the caller must not acknowledge them (the broker will deliver them again).
   * Side effects (dispatches, logs, counters) run only for committed messages, after the
   * commit. Never throws.
   */
  async handleBatch(items: Incoming[]): Promise<BatchResult> {
    if (items.length === 0) return { acked: 0, results: [] };
    this.stats.batches++;
    const decoded = items.map((m) =>
      m.topic === this.probeTopic ? PROBE : decodeUp(m.topic, m.payload)
    );
    const effects: Effect[][] = decoded.map(() => []);
    let r: { applied: number; error?: Error };
    try {
      r = await this.registry.batch(decoded.map((d, i) => async (tx) => {
        if (d !== PROBE && d.ok) await this.apply(tx, d.robotId, d.message, effects[i]);
      }));
    } catch (err) {
      r = { applied: 0, error: err as Error };
    }
    const results: Outcome[] = [];
    for (let i = 0; i < r.applied; i++) {
      const d = decoded[i];
      if (d === PROBE) {
        // After the commit of everything received before it, in order.
        this.probeEchoed(items[i].payload);
        results.push({ ok: true });
        continue;
      }
      if (!d.ok) {
        this.stats.dropped[d.reason]++;
        this.stats.droppedTotal++;
        this.log.warn(`dropped message on ${items[i].topic}: ${d.reason}: ${d.error}`);
        results.push({ ok: false, reason: d.reason });
        continue;
      }
      this.stats.received[d.message.type] = (this.stats.received[d.message.type] ?? 0) + 1;
      for (const fx of effects[i]) {
        try {
          fx();
        } catch (err) {
          this.log.warn(`after ${d.message.type} from ${d.robotId}: ${(err as Error).message}`);
        }
      }
      results.push({ ok: true });
    }
    if (r.error) {
      this.stats.applyErrors++;
      const d = decoded[r.applied];
      const what = d !== PROBE && d?.ok
        ? `${d.message.type} from ${d.robotId}`
        : `message on ${items[r.applied]?.topic}`;
      this.log.warn(
        `failed to apply ${what}: ${r.error.message}; not acknowledged (the broker will redeliver it)`,
      );
      return { acked: r.applied, results, error: r.error.message };
    }
    return { acked: r.applied, results };
  }

  /** Applies one message in the batch's transaction (`reg`); what follows the commit goes to `fx`. */
  private async apply(
    reg: RegistryTx,
    robotId: string,
    msg: UpMessage,
    fx: Effect[],
  ): Promise<void> {
    const at = this.nowIso();
    switch (msg.type) {
      case "register": {
        const prev = await reg.getRobot(robotId);
        const order: StatusOrder | null = msg.connection !== undefined
          ? { connection: msg.connection, rank: 0 }
          : null;
        await reg.recordRegister(robotId, at, msg);
        if (
          prev?.bootId != null && prev.bootId === msg.bootId && order && prev.statusOrder &&
          compareStatusOrder(order, prev.statusOrder) < 0
        ) {
          // A register of an older connection of this boot (redelivered late): that
          // connection is over, so it says nothing about being online now.
          fx.push(() => this.stats.staleRegisters++);
          return;
        }
        // A register counts as the online of its connection: the will of an older connection
        // arriving after it is stale.
        await reg.setStatusOrder(robotId, msg.bootId ?? null, order);
        await reg.setOnline(robotId, true, null);
        fx.push(() => {
          this.log.info(`robot ${robotId} registered (agent ${msg.agentVersion})`);
          // The agent (re)started: anything not yet accepted is sent again (it dedupes by id).
          this.dispatchFor(robotId);
        });
        return;
      }
      case "heartbeat": {
        const { bootId } = await reg.recordHeartbeat(robotId, at, msg);
        // A heartbeat of another boot than the registered one does not revive the robot.
        const sameBoot = msg.bootId === undefined || bootId === null || bootId === msg.bootId;
        if (sameBoot && await reg.setOnline(robotId, true, null)) {
          fx.push(() => {
            this.log.info(`robot ${robotId} is back (heartbeat)`);
            this.dispatchFor(robotId);
          });
        }
        return;
      }
      case "status": {
        const prev = await reg.getRobot(robotId);
        const verdict = prev ? statusVerdict(prev, await reg.lastStatusTs(robotId), msg) : "apply";
        if (verdict === "replay") {
          // Retained statuses are replayed on every subscribe: nothing new, and not a sign of
          // life (lastSeen stays).
          fx.push(() => this.stats.statusReplays++);
          return;
        }
        if (verdict === "stale") {
          fx.push(() => {
            this.stats.staleStatuses++;
            this.log.info(
              `robot ${robotId}: ignored a stale ${msg.status} status${
                msg.bootId ? ` (boot ${msg.bootId}, connection ${msg.connection ?? "?"})` : ""
              }`,
            );
          });
          return;
        }
        await reg.touchRobot(robotId, at);
        await reg.setLastStatusTs(robotId, msg.ts);
        if (msg.bootId !== undefined && msg.connection !== undefined) {
          await reg.setStatusOrder(robotId, msg.bootId, {
            connection: msg.connection,
            rank: msg.status === "online" ? 0 : 1,
          });
        }
        const changed = await reg.setOnline(
          robotId,
          msg.status === "online",
          msg.reason ?? (msg.status === "offline" ? "status offline" : null),
        );
        fx.push(() => {
          if (changed) {
            this.log.info(
              `robot ${robotId} is ${msg.status}${msg.reason ? ` (${msg.reason})` : ""}`,
            );
          }
          if (msg.status === "online") this.dispatchFor(robotId);
        });
        return;
      }
      case "task-status": {
        await reg.touchRobot(robotId, at);
        const task = await reg.getTask(msg.taskId);
        if (!task || task.robotId !== robotId) {
          // Unknown, or another robot's task id: a robot may only report on its own tasks.
          fx.push(() => {
            this.stats.unknownTaskReports++;
            this.log.warn(`robot ${robotId} reported on unknown task ${msg.taskId}`);
          });
          return;
        }
        const r = await reg.applyTaskEvent(msg.taskId, msg.state, at, {
          exitCode: msg.exitCode,
          stdout: msg.stdout,
          stderr: msg.stderr,
          error: msg.error,
        });
        if (r?.ignored) fx.push(() => this.stats.staleTaskReports++);
        // The robot runs a task that is cancelled (withdrawn: told once, and a robot with no
        // broker session misses what is published while it is away): tell it again.
        if (
          r?.ignored && r.task.state === "cancelled" &&
          (msg.state === "accepted" || msg.state === "running")
        ) {
          const cancelled = r.task;
          fx.push(() => this.sendCancel(cancelled));
        }
        return;
      }
    }
  }

  /**
   * Validates and stores a new task; dispatches it at once if the robot is online. `createdBy`
   * is the SPIFFE ID of the operator who asked for it.
   */
  async createTask(robotId: string, req: TaskRequest, createdBy?: string): Promise<TaskRecord> {
    if (!isRobotId(robotId)) throw new NotFoundError(`unknown robot ${robotId}`);
    const robot = await this.registry.getRobot(robotId);
    if (!robot) throw new NotFoundError(`unknown robot ${robotId}`);
    const now = this.now();
    const ttl = req.ttlSeconds ?? this.ttlDefault;
    const task = await this.registry.createTask({
      id: this.newId(),
      robotId,
      command: req.command,
      env: req.env,
      cwd: req.cwd,
      timeoutSeconds: req.timeoutSeconds,
      createdAt: now.toISOString(),
      expiresAt: new Date(now.getTime() + ttl * 1000).toISOString(),
      createdBy,
    });
    if (robot.online) this.dispatchTask(task);
    return task;
  }

  /**
   * An operator's cancel (`by` is its SPIFFE ID). A pending task nobody is publishing is
   * cancelled at once and never sent; any other unfinished task becomes `cancelling` and its
   * robot gets a signed `cancel` (now if it is online, else when it comes back); the robot's
   * `cancelled` report ends it. Throws NotFoundError, or ConflictError for a finished task.
   *
   * "Nobody is publishing it" is decided in this process, across awaits: a withdraw holds the
   * task's `inFlight` slot while it is written, and a dispatch holds it from before it reads
   * the task's current state until its PUBACK is recorded, so either the dispatch sees the
   * withdraw committed (and sends nothing) or the cancel sees the dispatch (and cancels).
   */
  async cancelTask(id: string, by: string): Promise<CancelResult> {
    const task = await this.registry.getTask(id);
    if (!task) throw new NotFoundError(`unknown task ${JSON.stringify(id)}`);
    if (isFinal(task.state)) {
      throw new ConflictError(`task ${id} is already ${task.state}: nothing to cancel`);
    }
    if (task.state === "cancelling") {
      this.sendCancel(task);
      return { task, outcome: "already" };
    }
    const cancel = (event: "withdraw" | "cancel") =>
      this.registry.applyTaskEvent(id, event, this.nowIso(), {
        cancelRequestedBy: by,
        ...(event === "withdraw" ? { error: `cancelled by ${by} before it was sent` } : {}),
      });
    let withdrawn = false;
    let r: Awaited<ReturnType<typeof cancel>>;
    if (task.state === "pending" && !this.inFlight.has(id)) {
      this.inFlight.add(id);
      try {
        r = await cancel("withdraw");
      } finally {
        this.releaseTask(id);
      }
      withdrawn = r !== undefined && !r.ignored;
      // No longer pending (dispatched since it was read): it may have reached the robot.
      if (r && r.ignored && !isFinal(r.task.state)) r = await cancel("cancel");
    } else {
      r = await cancel("cancel");
    }
    if (!r || r.ignored) {
      if (r && isFinal(r.task.state)) {
        throw new ConflictError(`task ${id} is already ${r.task.state}: nothing to cancel`);
      }
      throw new ConflictError(`task ${id} is ${r?.task.state ?? "gone"}: cannot cancel it`);
    }
    this.log.info(`task ${id} on ${task.robotId}: cancel requested by ${by} (${r.task.state})`);
    // Withdrawn: never sent by this process. A publish of an earlier process whose PUBACK was
    // lost may still have reached the broker, so the robot is told too (it ignores cancels of
    // tasks it does not know).
    this.sendCancel(r.task);
    return { task: r.task, outcome: withdrawn ? "withdrawn" : "cancelling" };
  }

  /**
   * Sends every undelivered task of one robot, and the cancels it is owed (`settled()` waits
   * for it). Never rejects.
   */
  dispatchFor(robotId: string): Promise<void> {
    return this.track(async () => {
      for (const t of await this.registry.tasksInStates(["pending", "dispatched"], robotId)) {
        this.dispatchTask(t);
      }
      for (const t of await this.registry.tasksInStates(["cancelling"], robotId)) {
        this.sendCancel(t);
      }
    }, `dispatch to ${robotId}`);
  }

  /** Publishes a signed cancel of `task` (cancelling, or withdrawn) to its robot if online. */
  private sendCancel(task: TaskRecord): void {
    if (!needsCancel(task.state) && task.state !== "cancelled") return;
    if (!this.publisher.connected()) return;
    if (this.cancelsInFlight.has(task.id)) {
      this.againCancels.add(task.id);
      return;
    }
    this.cancelsInFlight.add(task.id);
    this.track(async () => {
      try {
        const robot = await this.registry.getRobot(task.robotId);
        if (!robot?.online && task.state === "cancelling") return; // sent when it comes back
        const msg: CancelMessage = {
          v: PROTOCOL_VERSION,
          type: "cancel",
          robotId: task.robotId,
          ts: this.nowIso(),
          taskId: task.id,
        };
        if (task.cancelRequestedBy) {
          msg.reason = `cancelled by ${task.cancelRequestedBy}`.slice(0, 256);
        }
        let payload: Uint8Array;
        try {
          payload = this.signer.sign(msg);
        } catch (err) {
          this.stats.signErrors++;
          this.log.warn(`cannot sign the cancel of task ${task.id}: ${(err as Error).message}`);
          return;
        }
        try {
          await this.publisher.publish(downTopic(task.robotId, "cancel"), payload);
          this.stats.cancelsSent++;
        } catch (err) {
          this.stats.publishErrors++;
          this.log.warn(
            `could not publish the cancel of task ${task.id}: ${(err as Error).message}`,
          );
        }
      } finally {
        this.cancelsInFlight.delete(task.id);
        if (this.againCancels.delete(task.id)) {
          const current = await this.registry.getTask(task.id);
          if (current) this.sendCancel(current);
        }
      }
    }, `cancel of task ${task.id}`);
  }

  /** After (re)connecting to the broker: send what online robots are owed. Never rejects. */
  dispatchAllOnline(): Promise<void> {
    return this.track(async () => {
      for (const r of await this.registry.onlineRobots()) await this.dispatchFor(r.id);
    }, "dispatch to online robots");
  }

  /** Runs `job` as part of what `settled()` waits for; a failure is logged, not thrown. */
  private track(job: () => Promise<void>, what: string): Promise<void> {
    const p: Promise<void> = job().catch((err) => {
      this.log.warn(`${what}: ${(err as Error).message}`);
    }).finally(() => this.pending.delete(p));
    this.pending.add(p);
    return p;
  }

  /**
   * Publishes `task` unless it is in flight already. `task` may be stale (read before an
   * await): its current state is read again, with the task's `inFlight` slot held, so that a
   * task withdrawn meanwhile is never sent.
   */
  private dispatchTask(task: TaskRecord): void {
    if (!needsDispatch(task.state)) return;
    if (Date.parse(task.expiresAt) <= this.now().getTime()) return; // the sweeper expires it
    if (!this.publisher.connected()) return; // sent again on reconnect
    if (this.inFlight.has(task.id)) {
      this.againTasks.add(task.id);
      return;
    }
    this.inFlight.add(task.id);
    const p: Promise<void> = (async () => {
      const current = await this.registry.getTask(task.id);
      if (!current || !needsDispatch(current.state)) return; // withdrawn or cancelled meanwhile
      const msg: TaskMessage = {
        v: PROTOCOL_VERSION,
        type: "task",
        robotId: current.robotId,
        ts: this.nowIso(),
        id: current.id,
        command: current.command,
        env: current.env,
        timeoutSeconds: current.timeoutSeconds,
        createdAt: current.createdAt,
        expiresAt: current.expiresAt,
      };
      if (current.cwd) msg.cwd = current.cwd;
      let payload: Uint8Array;
      try {
        payload = this.signer.sign(msg);
      } catch (err) {
        // Left pending: tried again on the next trigger, expired by the sweeper at its TTL.
        this.stats.signErrors++;
        this.log.warn(`cannot sign task ${task.id}: ${(err as Error).message}`);
        return;
      }
      try {
        await this.publisher.publish(downTopic(current.robotId, "task"), payload);
      } catch (err) {
        this.stats.publishErrors++;
        this.log.warn(`could not publish task ${task.id}: ${(err as Error).message}`);
        return;
      }
      this.stats.tasksDispatched++;
      await this.registry.applyTaskEvent(task.id, "dispatch", this.nowIso());
    })().catch((err) => {
      this.log.warn(`task ${task.id}: ${(err as Error).message}`);
    }).finally(() => {
      this.releaseTask(task.id);
      this.pending.delete(p);
    });
    this.pending.add(p);
  }

  /** Frees a task's slot; sends it again when that was asked for meanwhile (re-reads it). */
  private releaseTask(id: string): void {
    this.inFlight.delete(id);
    if (!this.againTasks.delete(id)) return;
    this.track(async () => {
      const current = await this.registry.getTask(id);
      if (current) this.dispatchTask(current);
    }, `dispatch of task ${id} again`);
  }

  /** Resolves when all dispatches in flight have settled (tests, shutdown). */
  async settled(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
  }

  /**
   * Periodic housekeeping: robots silent for `missed` heartbeat intervals go offline; tasks
   * never delivered before their TTL expire; accepted/running tasks with no result long after
   * their timeout fail.
   *
   * While the broker link is down nothing is heard from anyone, so silence proves nothing: no
   * robot is marked offline and no running task is declared lost. Once the link is back, both
   * clocks restart from the reconnect (a full grace), so the queued messages and retained
   * statuses can arrive first.
   */
  async sweep(): Promise<{ offline: string[]; expired: string[]; lost: string[] }> {
    const now = this.now().getTime();
    const at = this.nowIso();
    const link = this.link;
    // One transaction: what is judged silent is marked offline before any message of this
    // process can be applied in between (a heartbeat that arrives meanwhile waits its turn).
    const until = this.heardUntil(now);
    const out = await this.registry.transaction(async (tx) => {
      const offline: string[] = [];
      if (link.up) {
        for (const r of await tx.onlineRobots()) {
          const interval = r.heartbeatIntervalSeconds ?? this.hbDefault;
          const heard = Math.max(Date.parse(r.lastSeen), link.since);
          if (until - heard > this.missed * interval * 1000) {
            if (await tx.setOnline(r.id, false, `missed ${this.missed} heartbeats`)) {
              offline.push(r.id);
            }
          }
        }
      }
      const expired: string[] = [];
      for (const t of await tx.tasksInStates(["pending", "dispatched"])) {
        if (Date.parse(t.expiresAt) <= now && !this.inFlight.has(t.id)) {
          const r = await tx.applyTaskEvent(t.id, "expire", at, {
            error: "not delivered to the robot before its TTL",
          });
          if (r?.changed) expired.push(t.id);
        }
      }
      // Cancelled before the robot took it up, and now past its expiresAt: the robot refuses it
      // if it ever arrives, so the cancel is complete.
      for (const t of await tx.tasksInStates(["cancelling"])) {
        if (t.acceptedAt !== null || t.startedAt !== null) continue;
        if (Date.parse(t.expiresAt) <= now && !this.inFlight.has(t.id)) {
          const r = await tx.applyTaskEvent(t.id, "expire", at, {
            error: "cancelled before the robot took it up (expired since)",
          });
          if (r?.changed) expired.push(t.id);
        }
      }
      const lost: string[] = [];
      if (link.up && !this.stalled(now) && now - link.since > this.grace * 1000) {
        for (const t of await tx.tasksInStates(["accepted", "running", "cancelling"])) {
          if (t.state === "cancelling" && t.acceptedAt === null && t.startedAt === null) continue;
          const since = Date.parse(t.startedAt ?? t.acceptedAt ?? t.updatedAt);
          if (now - since > (t.timeoutSeconds + this.grace) * 1000) {
            const r = await tx.applyTaskEvent(t.id, "lost", at, {
              error: `no result from robot ${t.robotId} within timeout + ${this.grace}s`,
            });
            if (r?.changed) lost.push(t.id);
          }
        }
      }
      return { offline, expired, lost };
    });
    for (const id of out.offline) {
      this.log.info(`robot ${id} is offline (missed ${this.missed} heartbeats)`);
    }
    return out;
  }

  /** online/offline from the registry, or `unknown` while the broker link is down. */
  robotState(r: RobotRecord): { state: RobotState; unknownSince: string | null } {
    if (!this.link.up) {
      return { state: "unknown", unknownSince: new Date(this.link.since).toISOString() };
    }
    if (this.stalled(this.now().getTime())) {
      return { state: "unknown", unknownSince: new Date(this.confirmed).toISOString() };
    }
    return { state: r.online ? "online" : "offline", unknownSince: null };
  }

  robotView(r: RobotRecord) {
    return {
      id: r.id,
      ...this.robotState(r),
      /** The last known state (kept for clients that predate `state`). */
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
      bootId: r.bootId,
      connection: r.statusOrder?.connection ?? null,
    };
  }
}

/**
 * Whether a status is news (docs/PROTOCOL.md, "Ordering statuses without clocks"). With
 * `bootId` and `connection`: a status of the robot's current boot is applied when its
 * `(connection, rank)` is after the last one applied; a status of another boot is stale.
 * Without them (older agents): compared by `ts`.
 */
export function statusVerdict(
  robot: RobotRecord,
  lastStatusTs: string | null,
  msg: StatusMessage,
): "apply" | "replay" | "stale" {
  if (msg.bootId !== undefined && msg.connection !== undefined) {
    // No register with a bootId yet: the first boot we hear of becomes the current one.
    if (robot.bootId === null) return "apply";
    if (msg.bootId !== robot.bootId) return "stale";
    if (!robot.statusOrder) return "apply";
    const c = compareStatusOrder(
      { connection: msg.connection, rank: msg.status === "online" ? 0 : 1 },
      robot.statusOrder,
    );
    return c > 0 ? "apply" : c === 0 ? "replay" : "stale";
  }
  if (lastStatusTs === null) return "apply";
  const d = Date.parse(msg.ts) - Date.parse(lastStatusTs);
  return d > 0 ? "apply" : d === 0 ? "replay" : "stale";
}
