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
  PROTOCOL_VERSION,
  REFUSAL_REASONS,
  type RefusalReason,
  type StatusMessage,
  type TaskMessage,
  type UpMessage,
} from "../mqtt/messages.ts";
import { downTopic, isRobotId } from "../fleet/topics.ts";
import {
  compareStatusOrder,
  isTransientConflict,
  type Registry,
  type RegistryTx,
  resendRequestedSinceClaim,
  type RobotRecord,
  type StatusOrder,
  type TaskRecord,
} from "./registry.ts";
import { isFinal, needsCancel, needsDispatch, reportEvent, UNTRUSTED_REFUSALS } from "./tasks.ts";
import { isPermanentWriteError, writeErrorCode, WriteHealth } from "./write_errors.ts";

/**
 * Turns a server -> robot message into the exact MQTT payload. The fleet server signs tasks and
 * cancels with its own X.509 SVID (`TaskSigner`, src/mqtt/signed.ts; docs/PROTOCOL.md, "Signed
 * tasks and cancels"), once per publish, so every copy carries a signature of the SVID current
 * then. `sign` may throw (the SVID expired, a payload over the limit): the message is then not
 * sent, the task stays where it was and is sent when it next can be (its TTL still applies).
 * There is no unsigned signer in production code: a server without an SVID does not start.
 */
export interface DownSigner {
  sign(msg: DownMessage): Uint8Array;
}

/** Refusal reports by reason; `task` counts ordinary refusals (no reason: allow-list, env...). */
export type RefusalCount = RefusalReason | "task";

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
  /** Signs every task and cancel (required: nothing is ever sent unsigned). */
  signer: DownSigner;
  /**
   * The server's own probe topic (`serverProbeTopic`): `FleetServer` publishes the time to it
   * every half second and subscribes to it, so each echo proves that the broker delivered
   * everything queued before it. Without it (unit tests) the wall clock is trusted.
   */
  probeTopic?: string;
  /** No echo for this long: the broker is not delivering (frozen, overloaded). Default 2000. */
  probeStallMs?: number;
  /**
   * This server process, as the owner of its task claims (each task is published by the one
   * server that claimed it, until the claim's lease ends). Default `server-<uuid>`.
   */
  instance?: string;
  /** How long a claim lasts: a server that dies mid-publish holds a task no longer. Default 30. */
  claimLeaseSeconds?: number;
  /**
   * Replicas (`--shared-subscription` on PostgreSQL): the fleet's probe clock, from the shared
   * state (replicas.ts). Robots are judged silent, and shown `unknown`, by it rather than by
   * this process's own link: a message the broker queued for any replica's session before that
   * time has been applied.
   */
  sharedClock?: SharedClock;
  /** Shared clock not advanced for this long: every replica shows `unknown`. Default 3000. */
  sharedStallMs?: number;
  /** Batches retried after a deadlock or a serialization failure before giving up. Default 5. */
  conflictRetries?: number;
}

/** The fleet's probe clock across replicas (see `FleetOptions.sharedClock`). */
export interface SharedClock {
  /** The oldest of the replicas' confirmed times (ms), or undefined before the first read. */
  confirmedAt(): number | undefined;
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
  /**
   * `refused` task reports by reason. `bad-signature`, `wrong-robot` and `replay` never change
   * a task (docs/PROTOCOL.md, "Refusals"); `expired` and `task` (no reason) are answers.
   */
  refusals: Record<RefusalCount, number>;
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
  /**
   * Messages the database refused for what they hold (write_errors.ts: a value out of range, a
   * constraint): they could never be written, so they are dropped like a malformed payload.
   */
  registryRefused: number;
  /** Registry commits for received messages (messages / batches = messages per fsync). */
  batches: number;
  /** Batches tried again after losing a race with another replica (deadlock, serialization). */
  conflictRetries: number;
}

/** One received MQTT message. */
export interface Incoming {
  topic: string;
  payload: Uint8Array;
  /** A server's own probe echo (of this session's probe topic), not a robot's message. */
  probe?: boolean;
  /** A message between servers (a replica's last will), handled on arrival: nothing to write. */
  control?: boolean;
}

/** Why a settled message was not applied: malformed, or refused by the database. */
export type DropCause = DropReason | "registry-refused";

export type Outcome = { ok: true } | { ok: false; reason: DropCause };

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
    refusals: {
      ...Object.fromEntries(REFUSAL_REASONS.map((r) => [r, 0])) as Record<RefusalReason, number>,
      task: 0,
    },
    publishErrors: 0,
    staleTaskReports: 0,
    unknownTaskReports: 0,
    statusReplays: 0,
    staleStatuses: 0,
    staleRegisters: 0,
    applyErrors: 0,
    registryRefused: 0,
    batches: 0,
    conflictRetries: 0,
  };
  /** Whether the last batch of messages was committed (for /healthz and the doctor). */
  readonly writes: WriteHealth;
  private readonly hbDefault: number;
  private readonly missed: number;
  private readonly ttlDefault: number;
  private readonly grace: number;
  /** The clock everything is stamped with (the database's, on replicas). */
  readonly now: () => Date;
  private readonly log: Logger;
  private readonly newId: () => string;
  /** The owner of this process's task claims. */
  readonly instance: string;
  private readonly claimLeaseMs: number;
  private readonly shared?: SharedClock;
  private readonly sharedStallMs: number;
  private readonly conflictRetries: number;
  /** Shared mode: since when the fleet's clock has been moving (silence is counted from it). */
  private sharedGraceFrom?: number;
  /** Cancels in flight, so that a burst of triggers publishes each cancel once. */
  private readonly cancelsInFlight = new Set<string>();
  /**
   * Cancels asked for again while in flight: sent once more when the slot is freed. The robot
   * may have subscribed after that publish reached the broker (it keeps no session while away),
   * so the broker acknowledged it to us and delivered it to nobody; the robot's register is what
   * asks again. It dedupes. (Tasks: the registry's `resend_requested_at`, see `claimAndPublish`.)
   */
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
    opts: FleetOptions,
  ) {
    this.hbDefault = opts.heartbeatIntervalSeconds ?? 10;
    this.missed = opts.missedHeartbeats ?? 3;
    this.ttlDefault = opts.defaultTaskTtlSeconds ?? 3600;
    this.grace = opts.resultGraceSeconds ?? 60;
    this.now = opts.now ?? (() => new Date());
    this.writes = new WriteHealth(() => this.now().getTime());
    this.log = opts.logger ?? silentLogger;
    this.newId = opts.newId ?? (() => crypto.randomUUID());
    this.link = { up: !opts.startDisconnected, since: this.now().getTime() };
    this.signer = opts.signer;
    this.probeTopic = opts.probeTopic;
    this.probeStallMs = opts.probeStallMs ?? 2000;
    this.confirmed = this.link.since;
    this.instance = opts.instance ?? `server-${crypto.randomUUID()}`;
    this.claimLeaseMs = (opts.claimLeaseSeconds ?? 30) * 1000;
    this.shared = opts.sharedClock;
    this.sharedStallMs = opts.sharedStallMs ?? 3000;
    this.conflictRetries = opts.conflictRetries ?? 5;
  }

  /** Replicas: the fleet's clock has not moved for `sharedStallMs` (or was never read). */
  private sharedStalled(now: number): boolean {
    const c = this.shared?.confirmedAt();
    return c === undefined || now - c > this.sharedStallMs;
  }

  /**
   * Silence is counted afresh (a full grace) from the next sweep: a server that becomes the
   * fleet's sweeper (replicas.ts) calls it.
   */
  resetSweepGrace(): void {
    this.sharedGraceFrom = undefined;
  }

  /**
   * The time up to which the fleet has been heard: with probes, the send time of the newest
   * echo (a heartbeat sent before it would have been delivered before it), else now. A frozen
   * broker or a server that was itself frozen (SIGSTOP, a stalled event loop) therefore never
   * turns its own silence into "missed heartbeats".
   */
  private heardUntil(now: number): number {
    if (this.shared) return Math.min(now, this.shared.confirmedAt() ?? -Infinity);
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
  ): Promise<{ ok: boolean; reason?: DropCause; error?: string }> {
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
    const decoded = items.map((m) =>
      m.probe || m.control || m.topic === this.probeTopic ? PROBE : decodeUp(m.topic, m.payload)
    );
    const results: Outcome[] = [];
    let done = 0;
    for (let attempt = 0;; attempt++) {
      const r = await this.applyBatch(items.slice(done), decoded.slice(done));
      results.push(...r.results);
      done += r.acked;
      // Stopped at a message the database refused for what it holds (settled, dropped): the
      // messages after it go on in a new batch.
      if (r.refused && done < items.length) {
        attempt = -1;
        continue;
      }
      if (r.error === undefined) return { acked: done, results };
      // Lost a race with another replica (PostgreSQL deadlock or serialization failure): what
      // was committed stays, the rest is tried again. Ordered row locks make this rare.
      if (r.conflict && attempt < this.conflictRetries) {
        this.stats.conflictRetries++;
        await new Promise((res) => setTimeout(res, 5 + Math.random() * 20 * (attempt + 1)));
        continue;
      }
      this.stats.applyErrors++;
      this.writes.failed(r.cause ?? r.error);
      const d = decoded[done];
      const what = d !== PROBE && d?.ok
        ? `${d.message.type} from ${d.robotId}`
        : `message on ${items[done]?.topic}`;
      this.log.warn(
        `failed to apply ${what}: ${r.error}; not acknowledged (the broker will redeliver it)`,
      );
      return { acked: done, results, error: r.error };
    }
  }

  /** One attempt: one transaction, the robots' rows locked first, in id order. */
  private async applyBatch(
    items: Incoming[],
    decoded: (typeof PROBE | ReturnType<typeof decodeUp>)[],
  ): Promise<
    {
      acked: number;
      results: Outcome[];
      error?: string;
      cause?: Error;
      conflict?: boolean;
      refused?: boolean;
    }
  > {
    this.stats.batches++;
    const effects: Effect[][] = decoded.map(() => []);
    const robots = decoded.flatMap((d) => d !== PROBE && d.ok ? [d.robotId] : []);
    let r: { applied: number; error?: Error };
    // The error a step threw (rolled back to its savepoint), to tell it from a failed COMMIT.
    let stepError: unknown;
    if (robots.length === 0) {
      // Only probe echoes and malformed messages: nothing to write. A probe then proves what it
      // proves (everything before it is committed) without the database: the broker's delivery
      // is judged apart from the registry's health.
      r = { applied: items.length };
    } else {
      try {
        r = await this.registry.batch(
          decoded.map((d, i) => async (tx) => {
            try {
              if (d !== PROBE && d.ok) await this.apply(tx, d.robotId, d.message, effects[i]);
            } catch (err) {
              stepError = err;
              throw err;
            }
          }),
          (tx) => tx.lockRobots(robots, this.nowIso()),
        );
      } catch (err) {
        r = { applied: 0, error: err as Error };
      }
    }
    // The database refused this message for what it holds (write_errors.ts): it would be
    // refused on every redelivery, and hold up every message behind it.
    const refused = r.error !== undefined && r.error === stepError &&
      isPermanentWriteError(r.error);
    if (robots.length > 0 && (r.error === undefined || refused)) this.writes.succeeded();
    const results: Outcome[] = [];
    for (let i = 0; i < r.applied; i++) {
      const d = decoded[i];
      if (d === PROBE) {
        // After the commit of everything received before it, in order.
        if (items[i].topic === this.probeTopic) this.probeEchoed(items[i].payload);
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
    if (r.error && refused) {
      // The ones before it are committed; it is dropped (counted, logged, acknowledged).
      const d = decoded[r.applied];
      const what = d !== PROBE && d?.ok
        ? `${d.message.type} from ${d.robotId}`
        : `message on ${items[r.applied]?.topic}`;
      this.stats.registryRefused++;
      this.log.warn(
        `dropped ${what}: the registry refused it (${
          writeErrorCode(r.error)
        }): ${r.error.message}; acknowledged, not applied`,
      );
      results.push({ ok: false, reason: "registry-refused" });
      return { acked: r.applied + 1, results, refused: true };
    }
    if (r.error) {
      return {
        acked: r.applied,
        results,
        error: r.error.message,
        cause: r.error,
        conflict: isTransientConflict(r.error),
      };
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
        const resend = opensConnection(prev, msg.bootId, order);
        // A register counts as the online of its connection: the will of an older connection
        // arriving after it is stale.
        await reg.setStatusOrder(robotId, msg.bootId ?? null, order);
        await reg.setOnline(robotId, true, null);
        fx.push(() => {
          this.log.info(`robot ${robotId} registered (agent ${msg.agentVersion})`);
          // A new connection (the robot keeps no broker session while away): anything not yet
          // accepted is sent again (the robot dedupes by id), and what is on its way now is
          // marked to go out again after its PUBACK. A repeated register of the same connection
          // is a replay.
          this.dispatchFor(robotId, { resend });
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
        // The online of a new connection applied before its register (another replica has it).
        const resend = msg.status === "online" &&
          opensConnection(
            prev,
            msg.bootId,
            msg.connection !== undefined ? { connection: msg.connection, rank: 0 } : null,
          );
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
          if (msg.status === "online") this.dispatchFor(robotId, { resend });
        });
        return;
      }
      case "task-status": {
        await reg.touchRobot(robotId, at);
        if (msg.state === "refused") {
          const why: RefusalCount = msg.reason ?? "task";
          fx.push(() => this.stats.refusals[why]++);
          if (msg.reason !== undefined && UNTRUSTED_REFUSALS.includes(msg.reason)) {
            // The robot could not trust that message: its task id may be forged, or it was a
            // copy of a task the robot runs or ran. Counted; the task is never touched.
            fx.push(() =>
              this.log.info(
                `robot ${robotId} refused a task message (${msg.reason}): ${msg.error ?? ""}`,
              )
            );
            return;
          }
        }
        const task = await reg.getTask(msg.taskId);
        if (!task || task.robotId !== robotId) {
          // Unknown, or another robot's task id: a robot may only report on its own tasks.
          fx.push(() => {
            this.stats.unknownTaskReports++;
            this.log.warn(`robot ${robotId} reported on unknown task ${msg.taskId}`);
          });
          return;
        }
        const event = reportEvent(msg, task);
        if (event === undefined) {
          // An `expired` refusal of a late copy of a task the robot took up: not about it.
          fx.push(() => this.stats.staleTaskReports++);
          return;
        }
        const r = await reg.applyTaskEvent(msg.taskId, event, at, {
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
   * Validates and stores a new task; dispatches it at once if the robot is online (the task is
   * stored already claimed by this server, so no other replica publishes it meanwhile).
   * `createdBy` is the SPIFFE ID of the operator who asked for it.
   */
  async createTask(robotId: string, req: TaskRequest, createdBy?: string): Promise<TaskRecord> {
    if (!isRobotId(robotId)) throw new NotFoundError(`unknown robot ${robotId}`);
    const robot = await this.registry.getRobot(robotId);
    if (!robot) throw new NotFoundError(`unknown robot ${robotId}`);
    const now = this.now();
    const ttl = req.ttlSeconds ?? this.ttlDefault;
    const send = robot.online && this.publisher.connected();
    const task = await this.registry.transaction((tx) =>
      tx.createTask({
        id: this.newId(),
        robotId,
        command: req.command,
        env: req.env,
        cwd: req.cwd,
        timeoutSeconds: req.timeoutSeconds,
        createdAt: now.toISOString(),
        expiresAt: new Date(now.getTime() + ttl * 1000).toISOString(),
        createdBy,
      }, send ? this.claimFor(now.getTime()) : undefined)
    );
    if (send) this.publishClaimed(task);
    return task;
  }

  private claimFor(now: number): { owner: string; leaseUntil: string } {
    return { owner: this.instance, leaseUntil: new Date(now + this.claimLeaseMs).toISOString() };
  }

  /** A claim by another server that has not expired: it may be publishing the task right now. */
  private claimedByOther(t: TaskRecord, now: number): boolean {
    return t.dispatchOwner !== null && t.dispatchLeaseUntil !== null &&
      Date.parse(t.dispatchLeaseUntil) >= now;
  }

  /**
   * An operator's cancel (`by` is its SPIFFE ID). A pending task nobody is publishing is
   * cancelled at once and never sent; any other unfinished task becomes `cancelling` and its
   * robot gets a signed `cancel` (now if it is online, else when it comes back); the robot's
   * `cancelled` report ends it. Throws NotFoundError, or ConflictError for a finished task.
   *
   * "Nobody is publishing it" is decided in the database, in one transaction with the task's
   * row locked: a server publishes a task only while it holds a claim on it (`claimTasks`, taken
   * in one statement with the state check), so either the claim committed first (the task may
   * be on its way: it is cancelled on the robot) or the withdraw did (no claim can take it).
   */
  async cancelTask(id: string, by: string): Promise<CancelResult> {
    const now = this.now().getTime();
    const at = this.nowIso();
    const out = await this.registry.transaction(async (tx) => {
      const task = await tx.getTaskForUpdate(id);
      if (!task) throw new NotFoundError(`unknown task ${JSON.stringify(id)}`);
      if (isFinal(task.state)) {
        throw new ConflictError(`task ${id} is already ${task.state}: nothing to cancel`);
      }
      if (task.state === "cancelling") return { task, outcome: "already" as const };
      const withdraw = task.state === "pending" && !this.claimedByOther(task, now);
      const r = await tx.applyTaskEvent(
        id,
        withdraw ? "withdraw" : "cancel",
        at,
        {
          cancelRequestedBy: by,
          ...(withdraw ? { error: `cancelled by ${by} before it was sent` } : {}),
        },
      );
      if (!r || r.ignored) {
        throw new ConflictError(`task ${id} is ${r?.task.state ?? "gone"}: cannot cancel it`);
      }
      return { task: r.task, outcome: withdraw ? "withdrawn" as const : "cancelling" as const };
    });
    if (out.outcome !== "already") {
      this.log.info(
        `task ${id} on ${out.task.robotId}: cancel requested by ${by} (${out.task.state})`,
      );
    }
    // Withdrawn: never sent by a server that claimed it. A publish of an earlier process whose
    // PUBACK was lost may still have reached the broker, so the robot is told too (it ignores
    // cancels of tasks it does not know).
    this.sendCancel(out.task);
    return out;
  }

  /**
   * Sends the pending tasks of one robot (those no other server holds a claim on), with
   * `resend` also the dispatched ones it has not taken up (a new connection of the robot),
   * and the cancels it is owed (`settled()` waits for it). Never rejects.
   */
  dispatchFor(robotId: string, opts: { resend?: boolean } = {}): Promise<void> {
    return this.track(async () => {
      await this.claimAndPublish({
        robotId,
        states: opts.resend ? ["pending", "dispatched"] : ["pending"],
      }, opts.resend);
      for (const t of await this.registry.tasksInStates(["cancelling"], robotId)) {
        this.sendCancel(t);
      }
    }, `dispatch to ${robotId}`);
  }

  /**
   * Claims tasks (pages of 200) and publishes each; resolves when all are claimed. With
   * `resend` (a new connection of `q.robotId`), the robot's tasks another server, or this one,
   * holds a claim on are first marked in the same transaction (`requestResend`): that publish
   * may have reached the broker before the robot subscribed (it keeps no session while away),
   * so the broker acknowledged it and delivered it to nobody; its holder publishes it again
   * after the PUBACK (`publishClaimed`). With the broker link down nothing is published, but
   * a new connection's request is still recorded, on all its undelivered tasks: the reconnect
   * (`dispatchAllOnline`) or another replica's sweep sends them.
   */
  private async claimAndPublish(
    q: {
      robotId?: string;
      onlineOnly?: boolean;
      states?: ("pending" | "dispatched")[];
      resendRequested?: boolean;
    },
    resend = false,
  ): Promise<void> {
    if (!this.publisher.connected()) {
      // Pending ones are sent on reconnect anyway; a dispatched one only if marked.
      if (resend && q.robotId !== undefined) {
        const robotId = q.robotId;
        const at = this.nowIso();
        await this.registry.transaction((tx) => tx.requestResend(robotId, at, { all: true }));
      }
      return;
    }
    for (let page = 0;; page++) {
      const now = this.now().getTime();
      const at = new Date(now).toISOString();
      const claimed = await this.registry.transaction(async (tx) => {
        if (resend && page === 0 && q.robotId !== undefined) {
          await tx.requestResend(q.robotId, at);
        }
        return await tx.claimTasks({
          ...q,
          owner: this.instance,
          now: at,
          leaseUntil: this.claimFor(now).leaseUntil,
          limit: 200,
        });
      });
      for (const t of claimed) this.publishClaimed(t);
      if (claimed.length < 200) return;
    }
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

  /**
   * After (re)connecting to the broker: send what online robots are owed: pending tasks, and
   * dispatched ones a resend was asked for that nobody took up. Not the other dispatched ones:
   * each reached the broker, which delivered it if the robot was subscribed; a robot that was
   * not (it keeps no session while away) asks for it again with the register of its new
   * connection, and a register queued for this server's session while it was away arrives
   * now. Never rejects.
   */
  dispatchAllOnline(): Promise<void> {
    return this.track(async () => {
      await this.claimAndPublish({ onlineOnly: true, states: ["pending"], resendRequested: true });
      const online = new Set((await this.registry.onlineRobots()).map((r) => r.id));
      for (const t of await this.registry.tasksInStates(["cancelling"])) {
        if (online.has(t.robotId)) this.sendCancel(t);
      }
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
   * Publishes `task`, which this server has claimed (its state was checked by the claim, and
   * no withdraw can happen while the claim holds). On PUBACK the dispatch is recorded and the
   * claim released in one transaction; on failure the claim is released (tried again on the
   * next trigger, or by the sweeper). A task cancelled while it was on its way gets its cancel
   * again after the task's PUBACK, so the robot hears of it after the task whichever replica
   * sent the first cancel. A task a robot's new connection asked for while it was on its way
   * (`requestResend`) is claimed again in the PUBACK's transaction and published once more.
   */
  private publishClaimed(task: TaskRecord): void {
    this.track(async () => {
      let published = false;
      try {
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
          await this.publisher.publish(downTopic(task.robotId, "task"), payload);
        } catch (err) {
          this.stats.publishErrors++;
          this.log.warn(`could not publish task ${task.id}: ${(err as Error).message}`);
          return;
        }
        published = true;
        this.stats.tasksDispatched++;
        const { r, again } = await this.registry.transaction(async (tx) => {
          const r = await tx.applyTaskEvent(task.id, "dispatch", this.nowIso());
          await tx.releaseClaim(task.id, this.instance);
          await tx.clearClaimMark(task.id);
          // The robot's new connection asked for it while it was on its way (the mark is
          // newer than this claim's own): claimed again at once, published again.
          const now = this.now().getTime();
          const again = resendRequestedSinceClaim(r?.task.resendRequestedAt ?? null)
            ? await tx.claimTasks({
              taskId: task.id,
              states: ["dispatched"],
              owner: this.instance,
              now: new Date(now).toISOString(),
              leaseUntil: this.claimFor(now).leaseUntil,
              limit: 1,
            })
            : [];
          return { r, again };
        });
        if (r?.task.state === "cancelling") this.sendCancel(r.task);
        for (const t of again) this.publishClaimed(t);
      } finally {
        if (!published) {
          await this.registry.transaction((tx) => tx.releaseClaim(task.id, this.instance));
        }
      }
    }, `task ${task.id}`);
  }

  /** Resolves when all dispatches in flight have settled (tests, shutdown). */
  async settled(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
  }

  /**
   * Periodic housekeeping: robots silent for `missed` heartbeat intervals go offline; tasks
   * never delivered before their TTL expire; accepted/running tasks with no result long after
   * their timeout fail; pending tasks of online robots that nobody holds a claim on (a publish
   * that failed, a replica that died mid-publish) are sent.
   *
   * While the broker link is down nothing is heard from anyone, so silence proves nothing: no
   * robot is marked offline and no running task is declared lost. Once the link is back, both
   * clocks restart from the reconnect (a full grace), so the queued messages and retained
   * statuses can arrive first. With replicas the same holds for the fleet's clock (the oldest
   * of the replicas' probe clocks): one replica that cannot hear the broker stops everyone from
   * judging silence, since part of the robots' messages is queued for its session. Replicas run
   * the sweep on one of them only (replicas.ts).
   */
  async sweep(): Promise<{ offline: string[]; expired: string[]; lost: string[] }> {
    const now = this.now().getTime();
    const at = this.nowIso();
    const link = this.link;
    let judge: boolean;
    let graceFrom: number;
    let stalled: boolean;
    if (this.shared) {
      stalled = this.sharedStalled(now);
      if (stalled) this.sharedGraceFrom = undefined;
      else this.sharedGraceFrom ??= now;
      judge = !stalled;
      graceFrom = this.sharedGraceFrom ?? now;
    } else {
      stalled = this.stalled(now);
      judge = link.up;
      graceFrom = link.since;
    }
    // One transaction: what is judged silent is marked offline before any message of this
    // process can be applied in between (a heartbeat that arrives meanwhile waits its turn;
    // on PostgreSQL the robots' rows are locked in id order, as a batch locks them).
    const until = this.heardUntil(now);
    const offline = !judge ? [] : await this.registry.transaction(async (tx) => {
      const out: string[] = [];
      for (const r of await tx.onlineRobots()) {
        const interval = r.heartbeatIntervalSeconds ?? this.hbDefault;
        const heard = Math.max(Date.parse(r.lastSeen), graceFrom);
        if (until - heard > this.missed * interval * 1000) {
          if (await tx.setOnline(r.id, false, `missed ${this.missed} heartbeats`)) out.push(r.id);
        }
      }
      return out;
    }, "sweep");
    // Tasks one by one, each in its own transaction with its row locked: nothing here waits on
    // a lock while holding another.
    const settle = async (
      t: TaskRecord,
      event: "expire" | "lost",
      error: string,
      check: (cur: TaskRecord) => boolean,
    ): Promise<boolean> => {
      const r = await this.registry.transaction(async (tx) => {
        const cur = await tx.getTaskForUpdate(t.id);
        if (!cur || !check(cur)) return undefined;
        return await tx.applyTaskEvent(t.id, event, at, { error });
      }, "sweep");
      return r?.changed === true;
    };
    const expired: string[] = [];
    const due = (cur: TaskRecord) =>
      Date.parse(cur.expiresAt) <= now && !this.claimedByOther(cur, now);
    for (const t of await this.registry.tasksInStates(["pending", "dispatched"])) {
      if (!due(t)) continue;
      const ok = await settle(
        t,
        "expire",
        "not delivered to the robot before its TTL",
        (c) => needsDispatch(c.state) && due(c),
      );
      if (ok) expired.push(t.id);
    }
    // Cancelled before the robot took it up, and now past its expiresAt: the robot refuses it
    // if it ever arrives, so the cancel is complete.
    const untaken = (c: TaskRecord) =>
      c.state === "cancelling" && c.acceptedAt === null && c.startedAt === null && due(c);
    for (const t of await this.registry.tasksInStates(["cancelling"])) {
      if (!untaken(t)) continue;
      const ok = await settle(
        t,
        "expire",
        "cancelled before the robot took it up (expired since)",
        untaken,
      );
      if (ok) expired.push(t.id);
    }
    const lost: string[] = [];
    if (judge && !stalled && now - graceFrom > this.grace * 1000) {
      const late = (c: TaskRecord) => {
        if (!["accepted", "running", "cancelling"].includes(c.state)) return false;
        if (c.state === "cancelling" && c.acceptedAt === null && c.startedAt === null) {
          return false;
        }
        const since = Date.parse(c.startedAt ?? c.acceptedAt ?? c.updatedAt);
        return now - since > (c.timeoutSeconds + this.grace) * 1000;
      };
      for (const t of await this.registry.tasksInStates(["accepted", "running", "cancelling"])) {
        if (!late(t)) continue;
        const ok = await settle(
          t,
          "lost",
          `no result from robot ${t.robotId} within timeout + ${this.grace}s`,
          late,
        );
        if (ok) lost.push(t.id);
      }
    }
    // Pending tasks of online robots nobody is publishing (a publish that failed, a replica
    // that died holding a claim): claimed and sent; so are dispatched ones a resend was asked
    // for while such a claim held them. Other dispatched ones wait for their robot (and are
    // sent again when it registers).
    if (this.publisher.connected()) {
      await this.track(
        () =>
          this.claimAndPublish({ onlineOnly: true, states: ["pending"], resendRequested: true }),
        "re-dispatch",
      );
    }
    for (const id of offline) {
      this.log.info(`robot ${id} is offline (missed ${this.missed} heartbeats)`);
    }
    return { offline, expired, lost };
  }

  /**
   * online/offline from the registry, or `unknown` while the broker link is down. With replicas,
   * from the shared state only (the same on every replica): `unknown` while the fleet's clock
   * is stalled.
   */
  robotState(r: RobotRecord): { state: RobotState; unknownSince: string | null } {
    if (this.shared) {
      if (this.sharedStalled(this.now().getTime())) {
        const c = this.shared.confirmedAt();
        return {
          state: "unknown",
          unknownSince: new Date(c ?? this.link.since).toISOString(),
        };
      }
      return { state: r.online ? "online" : "offline", unknownSince: null };
    }
    if (!this.link.up) {
      return { state: "unknown", unknownSince: new Date(this.link.since).toISOString() };
    }
    if (this.stalled(this.now().getTime())) {
      return { state: "unknown", unknownSince: new Date(this.confirmed).toISOString() };
    }
    return { state: r.online ? "online" : "offline", unknownSince: null };
  }

  /** Replicas: whether the fleet's clock is moving (false: every robot is `unknown`). */
  fleetDelivering(): boolean {
    return this.shared ? !this.sharedStalled(this.now().getTime()) : this.linkState().delivering;
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

/**
 * Whether a register (or the online of `order`) opens a connection the server has not seen yet
 * (another boot, or a later connection of this one): the robot keeps no broker session while
 * away, so what was dispatched and not taken up is sent again. Without `bootId` and `connection` (older
 * agents): always.
 */
export function opensConnection(
  prev: RobotRecord | undefined | null,
  bootId: string | undefined,
  order: StatusOrder | null,
): boolean {
  if (!prev || bootId === undefined || order === null) return true;
  if (prev.bootId !== bootId || !prev.statusOrder) return true;
  return order.connection > prev.statusOrder.connection;
}
