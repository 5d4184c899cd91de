/**
 * The fleet server's durable state: robots and tasks. One storage interface, two backends:
 *
 * - SQLite (`node:sqlite`, registry_sqlite.ts): the embedded default, a file in the data dir;
 * - PostgreSQL (`pg`, registry_postgres.ts): `k8s4r server --database postgres://...`.
 *
 * Layers:
 * - `SqlBackend` / `SqlConn` (this file): what a backend provides: statements on one
 *   connection (`?` placeholders), transactions, its schema version. Each backend migrates its
 *   schema from the one numbered list in schema.ts.
 * - `RegistryTx`: every query of the registry, written ONCE for both dialects, on one
 *   connection. Adding a query = a method here; adding a column = an entry in schema.ts (both
 *   dialects side by side), its name in ROBOT_COLUMNS/TASK_COLUMNS and its line in
 *   `robotFromRow`/`taskFromRow`.
 * - `Registry`: the handle the server holds: `read()`, `transaction()`, `batch()` (one
 *   transaction, a savepoint per message) and one-call shortcuts.
 *
 * Everything is async (the PostgreSQL driver is). Within one process, write transactions are
 * serialized (SQLite: one connection, everything serialized), so a transaction's reads and
 * writes are never interleaved with another transaction of this process.
 */
import type { DeviceInfo } from "../mqtt/messages.ts";
import { applyHeartbeat, firstHeartbeat, openGaps } from "./heartbeat_window.ts";
import { isFinal, isTaskState, type TaskEvent, type TaskState, transition } from "./tasks.ts";
import { addBounded, boundedGap } from "./heartbeat_bounds.ts";

export { SCHEMA_VERSION } from "./schema.ts";

export type Dialect = "sqlite" | "postgres";
export type SqlValue = string | number | null;
export type Row = Record<string, unknown>;

/**
 * Statements on one connection. SQL uses `?` placeholders (the PostgreSQL backend numbers them)
 * and the common subset of both dialects; `dialect` is there for the few clauses that differ
 * (e.g. `FOR UPDATE SKIP LOCKED`, PostgreSQL only; see `forUpdate()`).
 */
export interface SqlConn {
  readonly dialect: Dialect;
  all(sql: string, params?: SqlValue[]): Promise<Row[]>;
  get(sql: string, params?: SqlValue[]): Promise<Row | undefined>;
  /** Resolves with the number of rows changed. */
  run(sql: string, params?: SqlValue[]): Promise<number>;
  /** Statements without parameters (SAVEPOINT ...). */
  exec(sql: string): Promise<void>;
}

export interface SqlBackend {
  readonly dialect: Dialect;
  /** Where the data lives, for logs and errors. Never contains a secret. */
  readonly location: string;
  /** Statements outside a transaction, each committed on its own (reads). */
  read<T>(fn: (c: SqlConn) => Promise<T>): Promise<T>;
  /**
   * BEGIN ... COMMIT on one connection, ROLLBACK when `fn` throws (or COMMIT fails, then
   * nothing is committed). Write transactions of one process run one at a time.
   */
  transaction<T>(fn: (c: SqlConn) => Promise<T>): Promise<T>;
  schemaVersion(): Promise<number>;
  /** The settings that "committed before PUBACK" rests on, by name. */
  durability(): Promise<Record<string, string>>;
  /**
   * A lock held by this process until `release()` or until its connection is lost (PostgreSQL:
   * `pg_try_advisory_lock` on a connection of its own); undefined when another process holds
   * it. Absent on SQLite (one server per file: it is always the only one).
   */
  tryLock?(key: string): Promise<SessionLock | undefined>;
  close(): Promise<void>;
}

export interface SessionLock {
  /** False once the connection holding it is gone (the lock went with it). */
  held(): boolean;
  release(): Promise<void>;
}

/** A write that lost a race with another replica's (deadlock, serialization failure): retry. */
export function isTransientConflict(err: unknown): boolean {
  const code = (err as { code?: unknown } | undefined)?.code;
  return code === "40P01" || code === "40001";
}

/**
 * A row lock for the rows a SELECT returns, until the transaction ends: `FOR UPDATE` on
 * PostgreSQL (with `SKIP LOCKED`: rows another transaction holds are left out, which is how
 * replicas split work); nothing on SQLite, where a write transaction already excludes every
 * other writer (BEGIN IMMEDIATE).
 */
export function forUpdate(dialect: Dialect, opts: { skipLocked?: boolean } = {}): string {
  if (dialect !== "postgres") return "";
  return opts.skipLocked ? " FOR UPDATE SKIP LOCKED" : " FOR UPDATE";
}

export interface RobotRecord {
  id: string;
  spiffeId: string | null;
  firstSeen: string;
  lastSeen: string;
  online: boolean;
  offlineReason: string | null;
  svidExpiresAt: string | null;
  agentVersion: string | null;
  heartbeatIntervalSeconds: number | null;
  /** The highest heartbeat seq received from the current boot. */
  lastHeartbeatSeq: number | null;
  /** Heartbeats received since the robot was first seen (each seq of a boot once). */
  heartbeatsReceived: number;
  /**
   * Heartbeats that never arrived: gaps in `seq` within one agent process (bootId), whatever
   * order they came in (heartbeat_window.ts): a late one fills its gap.
   */
  heartbeatsMissing: number;
  device: DeviceInfo | null;
  /** The agent process of the last `register` (null: none yet, or an agent without bootId). */
  bootId: string | null;
  /** `(connection, rank)` of the last status applied for `bootId`; null when unknown. */
  statusOrder: StatusOrder | null;
}

/** Orders the statuses of one boot: rank 0 = online, 1 = offline (the will comes last). */
export interface StatusOrder {
  connection: number;
  rank: 0 | 1;
}

/** Negative, zero or positive as `a` is before, equal to or after `b`. */
export function compareStatusOrder(a: StatusOrder, b: StatusOrder): number {
  return a.connection !== b.connection ? a.connection - b.connection : a.rank - b.rank;
}

export interface TaskRecord {
  id: string;
  robotId: string;
  command: string[];
  env: Record<string, string>;
  cwd: string | null;
  timeoutSeconds: number;
  state: TaskState;
  exitCode: number | null;
  stdout: string | null;
  stderr: string | null;
  error: string | null;
  dispatchCount: number;
  createdAt: string;
  expiresAt: string;
  dispatchedAt: string | null;
  acceptedAt: string | null;
  startedAt: string | null;
  finishedAt: string | null;
  updatedAt: string;
  /** The SPIFFE ID of the operator who created it (null: created before operators existed). */
  createdBy: string | null;
  cancelRequestedAt: string | null;
  /** The SPIFFE ID of the operator who asked to cancel it. */
  cancelRequestedBy: string | null;
  /** Who is publishing it (a server instance), until `dispatchLeaseUntil`; null when nobody. */
  dispatchOwner: string | null;
  dispatchLeaseUntil: string | null;
  /**
   * When the robot's new connection asked for it again while it was claimed (its publish may
   * have reached the broker before the robot subscribed); `RESEND_CLAIMED` while a claim that
   * took the request up holds it (so that the request outlives a claimer that dies before its
   * PUBACK is recorded: the sweep sends a dispatched task with either); null once a recorded
   * PUBACK took it up.
   */
  resendRequestedAt: string | null;
}

/**
 * The mark a claim leaves (`claimTasks`): the task is wanted and a claim took the request up.
 * Not a time any `requestResend` writes (the epoch), so a request that came while the claim
 * held is told apart from it whatever the clocks of the replicas say.
 */
export const RESEND_CLAIMED = "1970-01-01T00:00:00.000Z";

/** True if `mark` (a task's `resendRequestedAt`) is a request no claim has taken up yet. */
export function resendRequestedSinceClaim(mark: string | null): boolean {
  return mark !== null && Date.parse(mark) !== Date.parse(RESEND_CLAIMED);
}

/** Claims tasks to publish: each task is claimed by one server at a time, until the lease ends. */
export interface ClaimQuery {
  owner: string;
  /** The claimer's clock (the database's, on PostgreSQL replicas). */
  now: string;
  leaseUntil: string;
  robotId?: string;
  taskId?: string;
  /** Only tasks of robots that are online. */
  onlineOnly?: boolean;
  /** Default both: a dispatched task is sent again on a trigger (the robot registered again). */
  states?: ("pending" | "dispatched")[];
  /** Also dispatched tasks a resend was asked for (`requestResend`) that nobody took up. */
  resendRequested?: boolean;
  limit: number;
}

/** One fleet-server replica's row (PostgreSQL, `--shared-subscription`). */
export interface ReplicaRow {
  clientId: string;
  instance: string;
  startedAt: string;
  leaseUntil: string;
  /** Everything the broker queued for this client id before this time has been applied. */
  confirmedAt: string;
  linkUp: boolean;
  adoptedBy: string | null;
  /** lease_until < the database's now(). */
  expired: boolean;
  /** How long ago the lease expired (ms, database time; 0 while valid). */
  expiredForMs: number;
}

/** Where a page of the task list starts: after this task (newest first). */
export interface TaskCursor {
  createdAt: string;
  id: string;
}

export interface TaskQuery {
  robotId?: string;
  state?: TaskState;
  /** Rows per page (the caller bounds it). */
  limit: number;
  /** Only tasks after this one in the order (created_at DESC, id DESC). */
  after?: TaskCursor;
}

export interface NewTask {
  id: string;
  robotId: string;
  command: string[];
  env: Record<string, string>;
  cwd?: string;
  timeoutSeconds: number;
  createdAt: string;
  expiresAt: string;
  createdBy?: string;
}

export interface TaskUpdate {
  exitCode?: number | null;
  stdout?: string;
  stderr?: string;
  error?: string;
  /** With `cancel` and `withdraw`: who asked (recorded once, with the time). */
  cancelRequestedBy?: string;
}

export interface RegisterInfo {
  spiffeId: string;
  agentVersion: string;
  svidExpiresAt: string;
  device: DeviceInfo;
  heartbeatIntervalSeconds?: number;
  /** Telemetry (optional register field): reported to `onCommit` listeners, not stored. */
  svidIssuedAt?: string;
}

export interface HeartbeatInfo {
  seq: number;
  bootId?: string;
  svidExpiresAt: string;
  load?: [number, number, number];
  /** Telemetry (optional heartbeat fields): reported to `onCommit` listeners, not stored. */
  svidIssuedAt?: string;
  workloadApi?: "up" | "down";
  outboundQueueDepth?: number;
}

/**
 * What a committed transaction changed, for observers (metrics, the dashboard's events): given
 * to `Registry.onCommit` listeners after the COMMIT, never for what was rolled back.
 */
export type RegistryChange =
  | { kind: "online"; robotId: string; online: boolean; reason: string | null; at: string }
  | {
    kind: "heartbeat";
    robotId: string;
    at: string;
    seq: number;
    bootId: string | null;
    /** Heartbeats missing before this one (a gap in seq of the same boot). */
    missing: number;
    info: HeartbeatInfo;
  }
  | { kind: "register"; robotId: string; at: string; info: RegisterInfo }
  | { kind: "task"; task: TaskRecord; from: TaskState };

/** What a registry operation was for (the storage metrics' `op` label). */
export type StorageOp = "message" | "task" | "sweep" | "read";

/** Times each registry operation: its purpose, seconds, and whether it failed. */
export type StorageTimer = (op: StorageOp, seconds: number, failed: boolean) => void;

export interface TaskEventResult {
  task: TaskRecord;
  changed: boolean;
  ignored: boolean;
}

export interface BatchOutcome {
  /** Steps committed, in order. */
  applied: number;
  /** Why step `applied` failed (or why nothing was committed). */
  error?: Error;
}

/**
 * The columns read back, named rather than `*`: a PostgreSQL connection caches the plan of each
 * prepared statement, and `SELECT *` on a table that a newer replica has just altered fails
 * there ("cached plan must not change result type"). A new column goes here too.
 */
const ROBOT_COLUMNS = [
  "id",
  "spiffe_id",
  "first_seen",
  "last_seen",
  "online",
  "offline_reason",
  "svid_expires_at",
  "agent_version",
  "heartbeat_interval_seconds",
  "last_heartbeat_seq",
  "heartbeats_received",
  "heartbeats_missing",
  "heartbeat_window",
  "heartbeat_low_seq",
  "device",
  "boot_id",
  "status_connection",
  "status_rank",
].join(", ");

const TASK_COLUMNS = [
  "id",
  "robot_id",
  "command",
  "env",
  "cwd",
  "timeout_seconds",
  "state",
  "exit_code",
  "stdout",
  "stderr",
  "error",
  "dispatch_count",
  "created_at",
  "expires_at",
  "dispatched_at",
  "accepted_at",
  "started_at",
  "finished_at",
  "updated_at",
  "created_by",
  "cancel_requested_at",
  "cancel_requested_by",
  "dispatch_owner",
  "dispatch_lease_until",
  "resend_requested_at",
].join(", ");

function str(v: unknown): string | null {
  return typeof v === "string" ? v : null;
}
function num(v: unknown): number | null {
  return typeof v === "number" ? v : typeof v === "bigint" ? Number(v) : null;
}
function bool(v: unknown): boolean {
  return v === true || v === 1 || v === 1n;
}
function json(v: unknown): unknown {
  return typeof v === "string" ? JSON.parse(v) : v;
}

function robotFromRow(r: Row): RobotRecord {
  let device: DeviceInfo | null = null;
  if (typeof r.device === "string") {
    try {
      device = JSON.parse(r.device);
    } catch {
      device = null;
    }
  }
  return {
    id: String(r.id),
    spiffeId: str(r.spiffe_id),
    firstSeen: String(r.first_seen),
    lastSeen: String(r.last_seen),
    online: bool(r.online),
    offlineReason: str(r.offline_reason),
    svidExpiresAt: str(r.svid_expires_at),
    agentVersion: str(r.agent_version),
    heartbeatIntervalSeconds: num(r.heartbeat_interval_seconds),
    lastHeartbeatSeq: num(r.last_heartbeat_seq),
    heartbeatsReceived: num(r.heartbeats_received) ?? 0,
    heartbeatsMissing: addBounded(
      num(r.heartbeats_missing) ?? 0,
      num(r.last_heartbeat_seq) !== null
        ? openGaps(num(r.last_heartbeat_seq)!, str(r.heartbeat_window), num(r.heartbeat_low_seq))
        : 0,
    ),
    device,
    bootId: str(r.boot_id),
    statusOrder: num(r.status_connection) !== null
      ? { connection: num(r.status_connection)!, rank: num(r.status_rank) === 1 ? 1 : 0 }
      : null,
  };
}

function taskFromRow(r: Row): TaskRecord {
  const state = String(r.state);
  return {
    id: String(r.id),
    robotId: String(r.robot_id),
    command: json(r.command) as string[],
    env: json(r.env) as Record<string, string>,
    cwd: str(r.cwd),
    timeoutSeconds: num(r.timeout_seconds) ?? 0,
    state: isTaskState(state) ? state : "failed",
    exitCode: num(r.exit_code),
    stdout: str(r.stdout),
    stderr: str(r.stderr),
    error: str(r.error),
    dispatchCount: num(r.dispatch_count) ?? 0,
    createdAt: String(r.created_at),
    expiresAt: String(r.expires_at),
    dispatchedAt: str(r.dispatched_at),
    acceptedAt: str(r.accepted_at),
    startedAt: str(r.started_at),
    finishedAt: str(r.finished_at),
    updatedAt: String(r.updated_at),
    createdBy: str(r.created_by),
    cancelRequestedAt: str(r.cancel_requested_at),
    cancelRequestedBy: str(r.cancel_requested_by),
    dispatchOwner: str(r.dispatch_owner),
    dispatchLeaseUntil: str(r.dispatch_lease_until),
    resendRequestedAt: str(r.resend_requested_at),
  };
}

function replicaFromRow(r: Row): ReplicaRow {
  return {
    clientId: String(r.client_id),
    instance: String(r.instance),
    startedAt: String(r.started_at),
    leaseUntil: String(r.lease_until),
    confirmedAt: String(r.confirmed_at),
    linkUp: bool(r.link_up),
    adoptedBy: str(r.adopted_by),
    expired: bool(r.expired),
    expiredForMs: Math.max(0, num(r.expired_for_ms) ?? 0),
  };
}

const REPLICA_COLUMNS = `client_id, instance, started_at, lease_until, confirmed_at, link_up,
  adopted_by, lease_until < now() AS expired,
  CAST(EXTRACT(EPOCH FROM (now() - lease_until)) * 1000 AS BIGINT) AS expired_for_ms`;

/**
 * Text without NUL: SQLite (node:sqlite) cuts a string at its first NUL, and PostgreSQL refuses
 * one in text (a write that fails is never acknowledged, so the message would come back
 * forever). A robot's output may well contain one: it becomes U+FFFD in both.
 */
function clean(params: SqlValue[]): SqlValue[] {
  for (let i = 0; i < params.length; i++) {
    const v = params[i];
    if (typeof v === "string" && v.includes("\0")) {
      const out = params.slice();
      for (let j = i; j < out.length; j++) {
        const w = out[j];
        if (typeof w === "string") out[j] = w.replaceAll("\0", "\uFFFD");
      }
      return out;
    }
  }
  return params;
}

/** Runs after each statement of a transaction, with its SQL (fault injection in tests). */
export type StatementHook = (sql: string) => void;

/**
 * The registry's queries on one connection: inside a transaction (`Registry.transaction`,
 * `Registry.batch`) they are that transaction's statements; from `Registry.read` they are
 * auto-committed reads. Written once, for both dialects.
 */
export class RegistryTx {
  constructor(
    private readonly c: SqlConn,
    private readonly hook?: StatementHook,
    /** Where writes note what they changed (for `Registry.onCommit`); none on reads. */
    readonly changes?: RegistryChange[],
  ) {}

  get dialect(): Dialect {
    return this.c.dialect;
  }

  private async all(sql: string, params: SqlValue[] = []): Promise<Row[]> {
    const r = await this.c.all(sql, clean(params));
    this.hook?.(sql);
    return r;
  }
  private async get(sql: string, params: SqlValue[] = []): Promise<Row | undefined> {
    const r = await this.c.get(sql, clean(params));
    this.hook?.(sql);
    return r;
  }
  private async run(sql: string, params: SqlValue[] = []): Promise<number> {
    const r = await this.c.run(sql, clean(params));
    this.hook?.(sql);
    return r;
  }

  // ---- robots ----

  async getRobot(id: string): Promise<RobotRecord | undefined> {
    const r = await this.get(`SELECT ${ROBOT_COLUMNS} FROM robots WHERE id = ?`, [id]);
    return r ? robotFromRow(r) : undefined;
  }

  async listRobots(): Promise<RobotRecord[]> {
    return (await this.all(`SELECT ${ROBOT_COLUMNS} FROM robots ORDER BY id`)).map(robotFromRow);
  }

  /** Records that a robot was heard from at `at` (creating it on first contact). */
  async touchRobot(id: string, at: string): Promise<void> {
    await this.run(
      `INSERT INTO robots (id, first_seen, last_seen) VALUES (?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen`,
      [id, at, at],
    );
  }

  async recordRegister(id: string, at: string, info: RegisterInfo): Promise<void> {
    this.changes?.push({ kind: "register", robotId: id, at, info });
    await this.touchRobot(id, at);
    await this.run(
      `UPDATE robots SET spiffe_id = ?, agent_version = ?, svid_expires_at = ?, device = ?,
         heartbeat_interval_seconds = COALESCE(?, heartbeat_interval_seconds)
       WHERE id = ?`,
      [
        info.spiffeId,
        info.agentVersion,
        info.svidExpiresAt,
        JSON.stringify(info.device),
        info.heartbeatIntervalSeconds ?? null,
        id,
      ],
    );
  }

  /**
   * Counts a heartbeat (creating the robot on first contact) and returns the boot of the
   * robot's last register. Two statements: this runs for every heartbeat of the fleet. The
   * first (INSERT ... ON CONFLICT DO UPDATE) also locks the row until the commit, so the
   * accounting below cannot race another replica's.
   *
   * Each seq of a boot counts once, in whatever order they arrive (heartbeat_window.ts): a
   * duplicate is ignored, a late one fills its gap.
   */
  async recordHeartbeat(
    id: string,
    at: string,
    hb: HeartbeatInfo,
  ): Promise<{ bootId: string | null }> {
    const prev = await this.get(
      `INSERT INTO robots (id, first_seen, last_seen) VALUES (?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen
       RETURNING last_heartbeat_seq AS seq, heartbeat_boot_id AS boot, device, boot_id,
         heartbeat_window AS hb_window, heartbeat_low_seq AS hb_low,
         heartbeats_missing AS hb_missing`,
      [id, at, at],
    );
    const bootId = str(prev?.boot_id);
    const prevSeq = num(prev?.seq);
    const lost = num(prev?.hb_missing) ?? 0;
    const sameBoot = hb.bootId !== undefined && str(prev?.boot) === hb.bootId && prevSeq !== null;
    let next;
    if (sameBoot) {
      const v = applyHeartbeat(
        { max: prevSeq!, window: str(prev?.hb_window), low: num(prev?.hb_low), lost },
        hb.seq,
      );
      // QoS 1 may deliver a heartbeat twice: a seq already counted is a duplicate, not news.
      if (v.kind !== "new") return { bootId };
      next = v.state;
    } else {
      // A new boot (or an agent without bootId): the old boot's open gaps are final now.
      const closed = prevSeq !== null
        ? openGaps(prevSeq, str(prev?.hb_window), num(prev?.hb_low))
        : 0;
      next = { ...firstHeartbeat(hb.seq), lost: lost + closed };
    }
    // Bounded (heartbeat_bounds.ts): a robot chooses its seq and boot, and its jumps must not
    // overflow the counter (seq 0 then 2^53-1 on 1025 boots passed 2^63).
    next.lost = addBounded(lost, boundedGap(next.lost - lost));
    let device: string | null = null;
    if (hb.load && typeof prev?.device === "string") {
      try {
        const d = JSON.parse(prev.device);
        if (d && typeof d === "object") device = JSON.stringify({ ...d, load: hb.load });
      } catch { /* an unreadable device is left as it is */ }
    }
    await this.run(
      `UPDATE robots SET last_heartbeat_seq = ?, heartbeat_boot_id = ?, svid_expires_at = ?,
         heartbeats_received = heartbeats_received + 1, heartbeat_window = ?,
         heartbeat_low_seq = ?, heartbeats_missing = ?, device = COALESCE(?, device) WHERE id = ?`,
      [
        next.max,
        hb.bootId ?? null,
        hb.svidExpiresAt,
        next.window,
        next.low,
        next.lost,
        device,
        id,
      ],
    );
    this.changes?.push({
      kind: "heartbeat",
      robotId: id,
      at,
      seq: hb.seq,
      bootId: hb.bootId ?? null,
      // The gap just before this one (seqs skipped since the newest of its boot); a late one
      // that fills a gap counts 0 here.
      missing: sameBoot && hb.seq > prevSeq! ? boundedGap(hb.seq - prevSeq! - 1) : 0,
      info: hb,
    });
    return { bootId };
  }

  /**
   * Locks the rows of `ids` (creating the missing ones) in id order, first thing in a batch's
   * transaction: replicas applying batches that share robots then take the row locks in the
   * same order and cannot deadlock (PostgreSQL). Nothing on SQLite, where a write transaction
   * excludes every other writer.
   */
  async lockRobots(ids: string[], at: string): Promise<void> {
    if (this.dialect !== "postgres" || ids.length === 0) return;
    const list = [...new Set(ids)].join(",");
    await this.run(
      `INSERT INTO robots (id, first_seen, last_seen)
       SELECT t.id, ?, ? FROM unnest(string_to_array(?, ',')) AS t(id) ORDER BY t.id COLLATE "C"
       ON CONFLICT (id) DO NOTHING`,
      [at, at, list],
    );
    await this.all(
      `SELECT id FROM robots WHERE id = ANY (string_to_array(?, ',')) ORDER BY id FOR UPDATE`,
      [list],
    );
  }

  /**
   * Sets online/offline. Returns true when the value changed. (An online robot has no offline
   * reason: only this method writes either.)
   */
  async setOnline(id: string, online: boolean, reason: string | null): Promise<boolean> {
    const v = online ? 1 : 0;
    const flipped = await this.run(
      "UPDATE robots SET online = ?, offline_reason = ? WHERE id = ? AND online <> ?",
      [v, online ? null : reason, id, v],
    );
    if (flipped > 0) {
      this.changes?.push({
        kind: "online",
        robotId: id,
        online,
        reason: online ? null : reason,
        at: new Date().toISOString(),
      });
      return true;
    }
    if (!online) {
      await this.run("UPDATE robots SET offline_reason = ? WHERE id = ? AND online = ?", [
        reason,
        id,
        0,
      ]);
    }
    return false;
  }

  /** The `ts` of the newest status message applied, to ignore replays of older ones. */
  async lastStatusTs(id: string): Promise<string | null> {
    const r = await this.get("SELECT last_status_ts FROM robots WHERE id = ?", [id]);
    return r ? str(r.last_status_ts) : null;
  }

  async setLastStatusTs(id: string, ts: string): Promise<void> {
    await this.run("UPDATE robots SET last_status_ts = ? WHERE id = ?", [ts, id]);
  }

  /** Sets the robot's current boot (from a register) and the order of its last status. */
  async setStatusOrder(
    id: string,
    bootId: string | null,
    order: StatusOrder | null,
  ): Promise<void> {
    await this.run(
      "UPDATE robots SET boot_id = ?, status_connection = ?, status_rank = ? WHERE id = ?",
      [bootId, order?.connection ?? null, order?.rank ?? null, id],
    );
  }

  async onlineRobots(): Promise<RobotRecord[]> {
    return (await this.all(`SELECT ${ROBOT_COLUMNS} FROM robots WHERE online = ? ORDER BY id`, [1]))
      .map(robotFromRow);
  }

  // ---- tasks ----

  /** Inserts a pending task; with `claim`, claimed by its creator (who publishes it next). */
  async createTask(
    t: NewTask,
    claim?: { owner: string; leaseUntil: string },
  ): Promise<TaskRecord> {
    await this.run(
      `INSERT INTO tasks (id, robot_id, command, env, cwd, timeout_seconds, state, created_at,
         expires_at, updated_at, created_by, dispatch_owner, dispatch_lease_until)
       VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)`,
      [
        t.id,
        t.robotId,
        JSON.stringify(t.command),
        JSON.stringify(t.env),
        t.cwd ?? null,
        t.timeoutSeconds,
        t.createdAt,
        t.expiresAt,
        t.createdAt,
        t.createdBy ?? null,
        claim?.owner ?? null,
        claim?.leaseUntil ?? null,
      ],
    );
    return (await this.getTask(t.id))!;
  }

  /** The task, locked until the transaction ends (PostgreSQL). */
  async getTaskForUpdate(id: string): Promise<TaskRecord | undefined> {
    const r = await this.get(
      `SELECT ${TASK_COLUMNS} FROM tasks WHERE id = ?${forUpdate(this.dialect)}`,
      [id],
    );
    return r ? taskFromRow(r) : undefined;
  }

  /**
   * Claims up to `limit` undelivered tasks (pending or dispatched, not expired) that nobody has
   * claimed, or whose claim has expired (its holder died mid-publish), oldest first. One
   * statement: rows another transaction is claiming are skipped (SKIP LOCKED), and the outer
   * WHERE is checked again on the row it locked, so a task is claimed by one server at a time.
   * The claim marks each task `RESEND_CLAIMED`: a dispatched one claimed to be sent again stays
   * wanted if the claimer dies before its PUBACK is recorded, or its publish fails (the sweep
   * takes marked dispatched tasks); `recordedDispatch` clears that mark, not a newer request.
   */
  async claimTasks(q: ClaimQuery): Promise<TaskRecord[]> {
    const free = "(dispatch_lease_until IS NULL OR dispatch_lease_until < ?)";
    const list = (q.states ?? ["pending", "dispatched"]).map((x) =>
      x === "pending" ? "'pending'" : "'dispatched'"
    ).join(", ");
    const states = q.resendRequested
      ? `(state IN (${list}) OR (state = 'dispatched' AND resend_requested_at IS NOT NULL))`
      : `state IN (${list})`;
    const where = [states, free, "expires_at > ?"];
    const params: SqlValue[] = [q.now, q.now];
    if (q.robotId !== undefined) {
      where.push("robot_id = ?");
      params.push(q.robotId);
    }
    if (q.taskId !== undefined) {
      where.push("id = ?");
      params.push(q.taskId);
    }
    if (q.onlineOnly) {
      where.push("robot_id IN (SELECT id FROM robots WHERE online = ?)");
      params.push(1);
    }
    const rows = await this.all(
      `UPDATE tasks SET dispatch_owner = ?, dispatch_lease_until = ?, resend_requested_at = ?
       WHERE id IN (SELECT id FROM tasks WHERE ${where.join(" AND ")}
                    ORDER BY created_at, id LIMIT ?${forUpdate(this.dialect, { skipLocked: true })})
         AND ${states} AND ${free}
       RETURNING ${TASK_COLUMNS}`,
      [q.owner, q.leaseUntil, RESEND_CLAIMED, ...params, q.limit, q.now],
    );
    return rows.map(taskFromRow).sort((a, b) =>
      a.createdAt < b.createdAt ? -1 : a.createdAt > b.createdAt ? 1 : a.id < b.id ? -1 : 1
    );
  }

  /**
   * A new connection of `robotId` asks for its undelivered tasks again: marks those a server
   * holds a claim on (publishing them now; `claimTasks` takes the others), so that the holder
   * publishes again after its PUBACK, or the sweep if it never does. Not SKIP LOCKED: a row
   * another transaction holds (a PUBACK being recorded) is waited for and checked again, so a
   * claim released meanwhile is left to the caller's `claimTasks`, which comes after this in
   * the same transaction. The robot's row is locked first: batches lock it before its tasks, so
   * the task rows are never waited for in another order (PostgreSQL; SQLite serializes anyway).
   * Returns how many were marked. With `all`, the unclaimed ones too (a server that cannot
   * publish now: whoever can takes them up, `claimTasks` with `resendRequested`).
   */
  async requestResend(robotId: string, now: string, opts: { all?: boolean } = {}): Promise<number> {
    await this.get(`SELECT id FROM robots WHERE id = ?${forUpdate(this.dialect)}`, [robotId]);
    const claimed = opts.all ? [] : [now];
    return await this.run(
      `UPDATE tasks SET resend_requested_at = ?
       WHERE robot_id = ? AND state IN ('pending', 'dispatched') AND expires_at > ?${
        opts.all ? "" : " AND dispatch_owner IS NOT NULL AND dispatch_lease_until >= ?"
      }`,
      [now, robotId, now, ...claimed],
    );
  }

  /**
   * After a recorded PUBACK: the task's mark is cleared if it is the one its claim left
   * (`RESEND_CLAIMED`); a newer request (`requestResend` while the publish was on its way)
   * stays, for the caller to claim and publish again.
   */
  async clearClaimMark(id: string): Promise<void> {
    await this.run(
      "UPDATE tasks SET resend_requested_at = NULL WHERE id = ? AND resend_requested_at = ?",
      [id, RESEND_CLAIMED],
    );
  }

  /** Ends `owner`'s claim on a task (published, or given up). */
  async releaseClaim(id: string, owner: string): Promise<void> {
    await this.run(
      "UPDATE tasks SET dispatch_owner = NULL, dispatch_lease_until = NULL WHERE id = ? AND dispatch_owner = ?",
      [id, owner],
    );
  }

  /**
   * Ends the claims of every instance whose name starts with `prefix` but `except`: earlier
   * processes of this client id (one process per client id: they are dead), and this one's
   * own on a clean stop.
   */
  async releaseClaimsOf(prefix: string, except?: string): Promise<number> {
    return await this.run(
      `UPDATE tasks SET dispatch_owner = NULL, dispatch_lease_until = NULL
       WHERE dispatch_owner IS NOT NULL AND substr(dispatch_owner, 1, ?) = ?
         AND dispatch_owner <> ?`,
      [prefix.length, prefix, except ?? ""],
    );
  }

  // ---- replicas (PostgreSQL only: `--shared-subscription`) ----

  private pgOnly(what: string): void {
    if (this.dialect !== "postgres") throw new Error(`${what}: replicas need PostgreSQL`);
  }

  /**
   * Takes client id `clientId` for `instance` (this process), with a lease of `leaseMs`. A row
   * of an earlier process with that client id is taken over (its session on the broker is
   * ours now); its confirmed time is kept: what the broker queued for that session before it is
   * still to come. Returns the row and the database's clock.
   */
  async replicaJoin(
    clientId: string,
    instance: string,
    leaseMs: number,
  ): Promise<{ row: ReplicaRow; dbNow: string; previous: string | null }> {
    this.pgOnly("replicaJoin");
    const before = await this.get(
      "SELECT instance FROM replicas WHERE client_id = ? FOR UPDATE",
      [clientId],
    );
    const r = await this.get(
      `INSERT INTO replicas (client_id, instance, started_at, lease_until, confirmed_at, link_up,
         adopted_by, updated_at)
       VALUES (?, ?, now(), now() + CAST(? AS INTEGER) * interval '1 millisecond', now(), FALSE,
         NULL, now())
       ON CONFLICT (client_id) DO UPDATE SET instance = excluded.instance,
         started_at = excluded.started_at, lease_until = excluded.lease_until, link_up = FALSE,
         adopted_by = NULL, updated_at = excluded.updated_at
       RETURNING ${REPLICA_COLUMNS}, now() AS db_now`,
      [clientId, instance, leaseMs],
    );
    return {
      row: replicaFromRow(r!),
      dbNow: String(r!.db_now),
      previous: before ? String(before.instance) : null,
    };
  }

  /**
   * Renews `instance`'s lease on `clientId` and records its probe clock. False when the row is
   * no longer this instance's (another process took the client id over).
   */
  async replicaRenew(
    clientId: string,
    instance: string,
    leaseMs: number,
    confirmedAt: string | null,
    linkUp: boolean,
  ): Promise<{ ok: boolean; dbNow: string }> {
    this.pgOnly("replicaRenew");
    const r = await this.get(
      `UPDATE replicas SET lease_until = now() + CAST(? AS INTEGER) * interval '1 millisecond',
         confirmed_at = GREATEST(confirmed_at, COALESCE(?, confirmed_at)), link_up = ?,
         updated_at = now()
       WHERE client_id = ? AND instance = ? RETURNING now() AS db_now`,
      [leaseMs, confirmedAt, linkUp ? 1 : 0, clientId, instance],
    );
    if (r) return { ok: true, dbNow: String(r.db_now) };
    const now = await this.get("SELECT now() AS db_now");
    return { ok: false, dbNow: String(now!.db_now) };
  }

  /**
   * Records an adopted session's probe clock (its `link_up` stays the owner's); false when the
   * adoption is over (the owner joined again).
   */
  async replicaAdoptedTick(
    clientId: string,
    adopter: string,
    confirmedAt: string | null,
  ): Promise<boolean> {
    this.pgOnly("replicaAdoptedTick");
    return await this.run(
      `UPDATE replicas SET confirmed_at = GREATEST(confirmed_at, COALESCE(?, confirmed_at)),
         updated_at = now()
       WHERE client_id = ? AND adopted_by = ?`,
      [confirmedAt, clientId, adopter],
    ) > 0;
  }

  /** Every replica, with the database's clock. */
  async replicaList(): Promise<{ rows: ReplicaRow[]; dbNow: string }> {
    this.pgOnly("replicaList");
    const rows = await this.all(
      `SELECT ${REPLICA_COLUMNS}, now() AS db_now FROM replicas ORDER BY client_id`,
    );
    const now = rows.length
      ? String(rows[0].db_now)
      : String((await this.get("SELECT now() AS db_now"))!.db_now);
    return { rows: rows.map(replicaFromRow), dbNow: now };
  }

  /**
   * `adopter` takes over the broker session of `clientId`, unless another live instance
   * adopted it already: its owner has not renewed its lease for `expiredForMs`; or (with
   * `stalledForMs`) its owner is cut from the broker and its clock has not moved for that long;
   * or (with `deadInstance`) the broker published the last will of that process, which owned
   * the session or had adopted it.
   */
  async replicaAdopt(
    clientId: string,
    adopter: string,
    why: { expiredForMs: number } | { stalledForMs: number } | { deadInstance: string },
  ): Promise<boolean> {
    this.pgOnly("replicaAdopt");
    let cond: string;
    let arg: SqlValue[];
    if ("expiredForMs" in why) {
      cond = "lease_until < now() - CAST(? AS INTEGER) * interval '1 millisecond'";
      arg = [why.expiredForMs];
    } else if ("stalledForMs" in why) {
      cond =
        "link_up = FALSE AND confirmed_at < now() - CAST(? AS INTEGER) * interval '1 millisecond'";
      arg = [why.stalledForMs];
    } else {
      cond = "(instance = ? OR adopted_by = ?)";
      arg = [why.deadInstance, why.deadInstance];
    }
    const dead = "deadInstance" in why ? why.deadInstance : "";
    return await this.run(
      `UPDATE replicas SET adopted_by = ?, updated_at = now()
       WHERE client_id = ? AND instance <> ? AND ${cond}
         AND (adopted_by IS NULL OR adopted_by = ? OR adopted_by = ? OR NOT EXISTS (
           SELECT 1 FROM replicas a WHERE a.instance = replicas.adopted_by
             AND a.lease_until >= now()))`,
      [adopter, clientId, adopter, ...arg, adopter, dead],
    ) > 0;
  }

  /** The owner, alive, ends an adoption of its session (it connects again: the broker's). */
  async replicaReclaim(clientId: string, instance: string): Promise<boolean> {
    this.pgOnly("replicaReclaim");
    return await this.run(
      "UPDATE replicas SET adopted_by = NULL WHERE client_id = ? AND instance = ? AND adopted_by IS NOT NULL",
      [clientId, instance],
    ) > 0;
  }

  async replicaReleaseAdoption(clientId: string, adopter: string): Promise<void> {
    this.pgOnly("replicaReleaseAdoption");
    await this.run("UPDATE replicas SET adopted_by = NULL WHERE client_id = ? AND adopted_by = ?", [
      clientId,
      adopter,
    ]);
  }

  /** A clean stop: the lease ends now, so that the session is adopted without waiting. */
  async replicaLeave(clientId: string, instance: string): Promise<void> {
    this.pgOnly("replicaLeave");
    await this.run(
      "UPDATE replicas SET lease_until = now(), link_up = FALSE, updated_at = now() WHERE client_id = ? AND instance = ?",
      [clientId, instance],
    );
  }

  async getTask(id: string): Promise<TaskRecord | undefined> {
    const r = await this.get(`SELECT ${TASK_COLUMNS} FROM tasks WHERE id = ?`, [id]);
    return r ? taskFromRow(r) : undefined;
  }

  async listTasks(robotId: string, limit = 100): Promise<TaskRecord[]> {
    return (await this.all(
      `SELECT ${TASK_COLUMNS} FROM tasks WHERE robot_id = ? ORDER BY created_at DESC, id LIMIT ?`,
      [robotId, limit],
    )).map(taskFromRow);
  }

  /**
   * One page of tasks, newest first (created_at DESC, id DESC), optionally of one robot and in
   * one state. Keyset paging: a page starts strictly after `after`, so tasks created meanwhile
   * (newer than any cursor) never shift a page, and no task is repeated or skipped. The same
   * order on both backends: created_at is an ISO string (SQLite) or a TIMESTAMPTZ (PostgreSQL,
   * the cursor's string parsed as one), ids compare bytewise (COLLATE "C" on PostgreSQL).
   */
  async listTasksPage(q: TaskQuery): Promise<TaskRecord[]> {
    const where: string[] = [];
    const params: SqlValue[] = [];
    if (q.robotId !== undefined) {
      where.push("robot_id = ?");
      params.push(q.robotId);
    }
    if (q.state !== undefined) {
      where.push("state = ?");
      params.push(q.state);
    }
    if (q.after) {
      where.push("(created_at < ? OR (created_at = ? AND id < ?))");
      params.push(q.after.createdAt, q.after.createdAt, q.after.id);
    }
    params.push(q.limit);
    const sql = `SELECT ${TASK_COLUMNS} FROM tasks${
      where.length ? ` WHERE ${where.join(" AND ")}` : ""
    } ORDER BY created_at DESC, id DESC LIMIT ?`;
    return (await this.all(sql, params)).map(taskFromRow);
  }

  async tasksInStates(states: TaskState[], robotId?: string): Promise<TaskRecord[]> {
    const marks = states.map(() => "?").join(",");
    const sql = `SELECT ${TASK_COLUMNS} FROM tasks WHERE state IN (${marks})${
      robotId !== undefined ? " AND robot_id = ?" : ""
    } ORDER BY created_at, id`;
    const params = robotId !== undefined ? [...states, robotId] : states;
    return (await this.all(sql, params)).map(taskFromRow);
  }

  async countTasksByState(): Promise<Record<string, number>> {
    const out: Record<string, number> = {};
    for (
      const r of await this.all(
        "SELECT state, CAST(COUNT(*) AS INTEGER) AS n FROM tasks GROUP BY state",
      )
    ) out[String(r.state)] = num(r.n) ?? 0;
    return out;
  }

  /**
   * Applies an event through the state machine, in the caller's transaction. Results (exit
   * code, output) are written only when the transition is accepted, so a stale report never
   * overwrites a result.
   */
  async applyTaskEvent(
    id: string,
    event: TaskEvent,
    at: string,
    update: TaskUpdate = {},
  ): Promise<TaskEventResult | undefined> {
    const row = await this.get(
      `SELECT ${TASK_COLUMNS} FROM tasks WHERE id = ?${forUpdate(this.dialect)}`,
      [id],
    );
    if (!row) return undefined;
    const task = taskFromRow(row);
    const t = transition(task.state, event);
    if (t.ignored) return { task, changed: false, ignored: true };
    const sets: string[] = ["state = ?", "updated_at = ?"];
    const params: SqlValue[] = [t.to, at];
    const stamp = (col: string) => {
      sets.push(`${col} = COALESCE(${col}, ?)`);
      params.push(at);
    };
    if (event === "dispatch") {
      sets.push("dispatch_count = dispatch_count + 1", "dispatched_at = ?");
      params.push(at);
    }
    // While cancelling, progress reports keep the state but their times are recorded.
    if (t.to === "accepted" || event === "accepted") stamp("accepted_at");
    if (t.to === "running" || event === "running") stamp("started_at");
    if (isFinal(t.to)) stamp("finished_at");
    if ((event === "cancel" || event === "withdraw") && update.cancelRequestedBy !== undefined) {
      sets.push(
        "cancel_requested_at = COALESCE(cancel_requested_at, ?)",
        "cancel_requested_by = COALESCE(cancel_requested_by, ?)",
      );
      params.push(at, update.cancelRequestedBy);
    }
    if (update.exitCode !== undefined) {
      sets.push("exit_code = ?");
      params.push(update.exitCode);
    }
    for (const k of ["stdout", "stderr", "error"] as const) {
      if (update[k] !== undefined) {
        sets.push(`${k} = ?`);
        params.push(update[k]!);
      }
    }
    params.push(id);
    await this.run(`UPDATE tasks SET ${sets.join(", ")} WHERE id = ?`, params);
    const after = (await this.getTask(id))!;
    if (t.changed) this.changes?.push({ kind: "task", task: after, from: task.state });
    return { task: after, changed: t.changed, ignored: false };
  }
}

/** The registry handle the server holds. */
export class Registry {
  #hook?: StatementHook;
  #timer?: StorageTimer;
  readonly #listeners = new Set<(changes: readonly RegistryChange[]) => void>();

  constructor(private readonly backend: SqlBackend) {}

  /**
   * Times every operation (`read`, `transaction` by its `op`, `batch` as `message`); the
   * storage metrics. The timer must not throw.
   */
  setTimer(timer: StorageTimer | undefined): void {
    this.#timer = timer;
  }

  /**
   * Calls `listener` after each COMMIT with what it changed (robots online/offline, heartbeats,
   * registers, task transitions). Nothing of a rolled-back transaction or savepoint is reported.
   * Listeners run synchronously and must not throw (a throw is swallowed). Returns unsubscribe.
   */
  onCommit(listener: (changes: readonly RegistryChange[]) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  #committed(changes: RegistryChange[]): void {
    if (changes.length === 0) return;
    for (const l of this.#listeners) {
      try {
        l(changes);
      } catch { /* an observer never breaks a write */ }
    }
  }

  async #timed<T>(op: StorageOp, fn: () => Promise<T>, failedIf?: (r: T) => boolean): Promise<T> {
    const timer = this.#timer;
    if (!timer) return await fn();
    const t0 = performance.now();
    let failed = true;
    try {
      const r = await fn();
      failed = failedIf?.(r) ?? false;
      return r;
    } finally {
      try {
        timer(op, (performance.now() - t0) / 1000, failed);
      } catch { /* metrics never break a write */ }
    }
  }

  get dialect(): Dialect {
    return this.backend.dialect;
  }

  /** Where the data lives (a path, or a PostgreSQL URL without secrets). */
  get location(): string {
    return this.backend.location;
  }

  /**
   * Fault injection for tests: `hook` runs after every statement of a transaction or batch
   * (with its SQL); a throw from it fails that statement after it ran, as a failing disk would.
   */
  setStatementHook(hook: StatementHook | undefined): void {
    this.#hook = hook;
  }

  private tx(c: SqlConn, hooked: boolean, changes?: RegistryChange[]): RegistryTx {
    return new RegistryTx(c, hooked ? this.#hook : undefined, changes);
  }

  /** Reads, outside a transaction. */
  read<T>(fn: (tx: RegistryTx) => Promise<T>): Promise<T> {
    return this.#timed("read", () => this.backend.read((c) => fn(this.tx(c, false))));
  }

  /**
   * One transaction: all of `fn`'s writes or none. `op` is what it is for, in the storage
   * metrics (default `task`; the sweeper's is `sweep`).
   */
  transaction<T>(fn: (tx: RegistryTx) => Promise<T>, op: StorageOp = "task"): Promise<T> {
    return this.#timed(op, async () => {
      let changes: RegistryChange[] = [];
      const r = await this.backend.transaction((c) => {
        changes = []; // a backend that retries the transaction starts it afresh
        return fn(this.tx(c, true, changes));
      });
      this.#committed(changes);
      return r;
    });
  }

  /**
   * Runs each step in ONE transaction, each in its own savepoint, in order, and stops at the
   * first step that throws: that step's writes are rolled back, the earlier ones are committed.
   * `applied` counts the committed steps; when COMMIT itself fails nothing is committed
   * (`applied` 0). One commit (one fsync) for the whole batch. `before` runs first, in the same
   * transaction (the batch's row locks).
   */
  batch(
    steps: ((tx: RegistryTx) => Promise<void>)[],
    before?: (tx: RegistryTx) => Promise<void>,
  ): Promise<BatchOutcome> {
    if (steps.length === 0) return Promise.resolve({ applied: 0 });
    return this.#timed(
      "message",
      () => this.#batch(steps, before),
      (r) => r.error !== undefined,
    );
  }

  async #batch(
    steps: ((tx: RegistryTx) => Promise<void>)[],
    before?: (tx: RegistryTx) => Promise<void>,
  ): Promise<BatchOutcome> {
    let applied = 0;
    let error: Error | undefined;
    let changes: RegistryChange[] = [];
    try {
      await this.backend.transaction(async (c) => {
        changes = [];
        const tx = this.tx(c, true, changes);
        // Outside the savepoints: if it fails, nothing of the batch is committed.
        if (before) await before(tx);
        for (const step of steps) {
          await c.exec("SAVEPOINT step");
          const mark = changes.length;
          try {
            await step(tx);
            await c.exec("RELEASE step");
          } catch (err) {
            changes.length = mark; // rolled back: never reported
            await c.exec("ROLLBACK TO step");
            await c.exec("RELEASE step");
            error = err instanceof Error ? err : new Error(String(err));
            break;
          }
          applied++;
        }
      });
    } catch (err) {
      return { applied: 0, error: err instanceof Error ? err : new Error(String(err)) };
    }
    this.#committed(changes);
    return error ? { applied, error } : { applied };
  }

  schemaVersion(): Promise<number> {
    return this.backend.schemaVersion();
  }

  /** See `SqlBackend.tryLock`; undefined when the backend has none (SQLite). */
  tryLock(key: string): Promise<SessionLock | undefined> {
    return this.backend.tryLock ? this.backend.tryLock(key) : Promise.resolve(undefined);
  }

  /** The settings "written before PUBACK" rests on (journal mode, sync level...). */
  durability(): Promise<Record<string, string>> {
    return this.backend.durability();
  }

  close(): Promise<void> {
    return this.backend.close();
  }

  // ---- one-call shortcuts: reads outside a transaction, each write its own transaction ----

  getRobot(id: string): Promise<RobotRecord | undefined> {
    return this.read((tx) => tx.getRobot(id));
  }
  listRobots(): Promise<RobotRecord[]> {
    return this.read((tx) => tx.listRobots());
  }
  onlineRobots(): Promise<RobotRecord[]> {
    return this.read((tx) => tx.onlineRobots());
  }
  lastStatusTs(id: string): Promise<string | null> {
    return this.read((tx) => tx.lastStatusTs(id));
  }
  getTask(id: string): Promise<TaskRecord | undefined> {
    return this.read((tx) => tx.getTask(id));
  }
  listTasks(robotId: string, limit?: number): Promise<TaskRecord[]> {
    return this.read((tx) => tx.listTasks(robotId, limit));
  }
  listTasksPage(q: TaskQuery): Promise<TaskRecord[]> {
    return this.read((tx) => tx.listTasksPage(q));
  }
  tasksInStates(states: TaskState[], robotId?: string): Promise<TaskRecord[]> {
    return this.read((tx) => tx.tasksInStates(states, robotId));
  }
  countTasksByState(): Promise<Record<string, number>> {
    return this.read((tx) => tx.countTasksByState());
  }
  touchRobot(id: string, at: string): Promise<void> {
    return this.transaction((tx) => tx.touchRobot(id, at));
  }
  recordRegister(id: string, at: string, info: RegisterInfo): Promise<void> {
    return this.transaction((tx) => tx.recordRegister(id, at, info));
  }
  recordHeartbeat(id: string, at: string, hb: HeartbeatInfo): Promise<{ bootId: string | null }> {
    return this.transaction((tx) => tx.recordHeartbeat(id, at, hb));
  }
  setOnline(id: string, online: boolean, reason: string | null): Promise<boolean> {
    return this.transaction((tx) => tx.setOnline(id, online, reason));
  }
  createTask(t: NewTask): Promise<TaskRecord> {
    return this.transaction((tx) => tx.createTask(t));
  }
  applyTaskEvent(
    id: string,
    event: TaskEvent,
    at: string,
    update?: TaskUpdate,
  ): Promise<TaskEventResult | undefined> {
    return this.transaction((tx) => tx.applyTaskEvent(id, event, at, update));
  }
}
