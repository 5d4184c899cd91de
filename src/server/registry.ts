/**
 * The fleet server's durable state: robots and tasks in an embedded SQLite database
 * (`node:sqlite`) under the data dir. Schema changes are numbered migrations recorded in
 * `PRAGMA user_version`; a database written by a newer k8s4r is refused rather than corrupted.
 */
import { DatabaseSync } from "node:sqlite";
import { join } from "node:path";
import type { DeviceInfo } from "../mqtt/messages.ts";
import { isFinal, isTaskState, type TaskEvent, type TaskState, transition } from "./tasks.ts";

export const DB_FILE = "registry.sqlite";

/** Each entry moves the schema from version i to i+1. Never edit one that has shipped. */
const MIGRATIONS: string[] = [
  `CREATE TABLE robots (
     id TEXT PRIMARY KEY,
     spiffe_id TEXT,
     first_seen TEXT NOT NULL,
     last_seen TEXT NOT NULL,
     online INTEGER NOT NULL DEFAULT 0,
     offline_reason TEXT,
     last_status_ts TEXT,
     device TEXT,
     svid_expires_at TEXT,
     agent_version TEXT,
     heartbeat_interval_seconds INTEGER,
     last_heartbeat_seq INTEGER
   );
   CREATE TABLE tasks (
     id TEXT PRIMARY KEY,
     robot_id TEXT NOT NULL,
     command TEXT NOT NULL,
     env TEXT NOT NULL,
     cwd TEXT,
     timeout_seconds INTEGER NOT NULL,
     state TEXT NOT NULL,
     exit_code INTEGER,
     stdout TEXT,
     stderr TEXT,
     error TEXT,
     dispatch_count INTEGER NOT NULL DEFAULT 0,
     created_at TEXT NOT NULL,
     expires_at TEXT NOT NULL,
     dispatched_at TEXT,
     accepted_at TEXT,
     started_at TEXT,
     finished_at TEXT,
     updated_at TEXT NOT NULL
   );
   CREATE INDEX tasks_robot_state ON tasks (robot_id, state);
   CREATE INDEX tasks_state ON tasks (state);`,
  // Heartbeat accounting: how many arrived, and how many were lost (gaps in seq per boot).
  `ALTER TABLE robots ADD COLUMN heartbeat_boot_id TEXT;
   ALTER TABLE robots ADD COLUMN heartbeats_received INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE robots ADD COLUMN heartbeats_missing INTEGER NOT NULL DEFAULT 0;`,
  // Status ordering without clocks (docs/PROTOCOL.md): the boot of the last register, and the
  // (connection, rank) of the last status applied (rank 0 online, 1 offline).
  `ALTER TABLE robots ADD COLUMN boot_id TEXT;
   ALTER TABLE robots ADD COLUMN status_connection INTEGER;
   ALTER TABLE robots ADD COLUMN status_rank INTEGER;`,
  // Operators (issue 11): who created a task (the SPIFFE ID of its operator), who asked to
  // cancel it and when; indexes for the cursor-paged task list (newest first).
  `ALTER TABLE tasks ADD COLUMN created_by TEXT;
   ALTER TABLE tasks ADD COLUMN cancel_requested_at TEXT;
   ALTER TABLE tasks ADD COLUMN cancel_requested_by TEXT;
   CREATE INDEX tasks_created ON tasks (created_at, id);
   CREATE INDEX tasks_robot_created ON tasks (robot_id, created_at, id);
   CREATE INDEX tasks_state_created ON tasks (state, created_at, id);`,
];

export const SCHEMA_VERSION = MIGRATIONS.length;

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
  lastHeartbeatSeq: number | null;
  /** Heartbeats received since the robot was first seen. */
  heartbeatsReceived: number;
  /** Heartbeats that never arrived: gaps in `seq` within one agent process (bootId). */
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

type Row = Record<string, unknown>;

function str(v: unknown): string | null {
  return typeof v === "string" ? v : null;
}
function num(v: unknown): number | null {
  return typeof v === "number" ? v : typeof v === "bigint" ? Number(v) : null;
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
    online: num(r.online) === 1,
    offlineReason: str(r.offline_reason),
    svidExpiresAt: str(r.svid_expires_at),
    agentVersion: str(r.agent_version),
    heartbeatIntervalSeconds: num(r.heartbeat_interval_seconds),
    lastHeartbeatSeq: num(r.last_heartbeat_seq),
    heartbeatsReceived: num(r.heartbeats_received) ?? 0,
    heartbeatsMissing: num(r.heartbeats_missing) ?? 0,
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
    command: JSON.parse(String(r.command)),
    env: JSON.parse(String(r.env)),
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
  };
}

export class Registry {
  private constructor(private readonly db: DatabaseSync, readonly path: string) {}

  /** Opens (creating if needed) `<dataDir>/registry.sqlite` and migrates it. */
  static async open(dataDir: string): Promise<Registry> {
    await Deno.mkdir(dataDir, { recursive: true, mode: 0o700 });
    return Registry.openFile(join(dataDir, DB_FILE));
  }

  /** `:memory:` is accepted, for unit tests. */
  static openFile(path: string): Registry {
    const db = new DatabaseSync(path);
    try {
      // The server acknowledges a message (PUBACK) only after its write is committed, and the
      // broker then forgets it: the commit must survive a power loss, not only a crash of this
      // process. In WAL mode NORMAL syncs only at checkpoints (a commit can be lost); FULL syncs
      // the WAL on every commit. The server batches messages per commit (fleet_server.ts), so
      // this costs one fsync per batch, not per message.
      db.exec(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
      );
      migrate(db, path);
    } catch (err) {
      db.close();
      throw err;
    }
    return new Registry(db, path);
  }

  close(): void {
    this.#stmts.clear();
    if (this.db.isOpen) this.db.close();
  }

  // Compiling SQL costs more than running it: every statement is prepared once and reused.
  #stmts = new Map<string, ReturnType<DatabaseSync["prepare"]>>();
  private stmt(sql: string): ReturnType<DatabaseSync["prepare"]> {
    let st = this.#stmts.get(sql);
    if (!st) {
      st = this.db.prepare(sql);
      this.#stmts.set(sql, st);
    }
    return st;
  }

  /**
   * Runs `fn` in one transaction: the writes one message causes are committed together (one WAL
   * commit instead of one per statement), and all or none of them land.
   */
  transaction<T>(fn: () => T): T {
    if (this.db.isTransaction) return fn();
    // IMMEDIATE takes the write lock up front, so a read-then-write cannot race another writer.
    this.db.exec("BEGIN IMMEDIATE");
    try {
      const r = fn();
      this.db.exec("COMMIT");
      return r;
    } catch (err) {
      // A failed COMMIT may already have rolled back (SQLITE_FULL, SQLITE_IOERR).
      if (this.db.isTransaction) this.db.exec("ROLLBACK");
      throw err;
    }
  }

  /**
   * Runs each step in one transaction, each in its own savepoint, in order, and stops at the
   * first step that throws: that step's writes are rolled back, the earlier ones are committed.
   * `applied` counts the committed steps; when COMMIT itself fails nothing is committed
   * (`applied` 0). One commit (one fsync) for the whole batch.
   */
  batch(steps: (() => void)[]): { applied: number; error?: Error } {
    if (steps.length === 0) return { applied: 0 };
    if (this.db.isTransaction) throw new Error("registry: batch() inside a transaction");
    this.db.exec("BEGIN IMMEDIATE");
    let applied = 0;
    let error: Error | undefined;
    try {
      for (const step of steps) {
        this.db.exec("SAVEPOINT step");
        try {
          step();
          this.db.exec("RELEASE step");
        } catch (err) {
          this.db.exec("ROLLBACK TO step");
          this.db.exec("RELEASE step");
          error = err instanceof Error ? err : new Error(String(err));
          break;
        }
        applied++;
      }
      this.db.exec("COMMIT");
    } catch (err) {
      if (this.db.isTransaction) this.db.exec("ROLLBACK");
      return { applied: 0, error: err instanceof Error ? err : new Error(String(err)) };
    }
    return error ? { applied, error } : { applied };
  }

  schemaVersion(): number {
    return userVersion(this.db);
  }

  /** The journal mode and sync level in force (what "written before PUBACK" rests on). */
  durability(): { journalMode: string; synchronous: number } {
    const j = this.db.prepare("PRAGMA journal_mode").get() as Row;
    const s = this.db.prepare("PRAGMA synchronous").get() as Row;
    return { journalMode: String(j.journal_mode), synchronous: num(s.synchronous) ?? -1 };
  }

  // ---- robots ----

  getRobot(id: string): RobotRecord | undefined {
    const r = this.stmt("SELECT * FROM robots WHERE id = ?").get(id) as Row | undefined;
    return r ? robotFromRow(r) : undefined;
  }

  listRobots(): RobotRecord[] {
    return (this.stmt("SELECT * FROM robots ORDER BY id").all() as Row[]).map(robotFromRow);
  }

  /** Records that a robot was heard from at `at` (creating it on first contact). */
  touchRobot(id: string, at: string): void {
    this.stmt(
      `INSERT INTO robots (id, first_seen, last_seen) VALUES (?, ?, ?)
       ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen`,
    ).run(id, at, at);
  }

  recordRegister(id: string, at: string, info: {
    spiffeId: string;
    agentVersion: string;
    svidExpiresAt: string;
    device: DeviceInfo;
    heartbeatIntervalSeconds?: number;
  }): void {
    this.touchRobot(id, at);
    this.stmt(
      `UPDATE robots SET spiffe_id = ?, agent_version = ?, svid_expires_at = ?, device = ?,
         heartbeat_interval_seconds = COALESCE(?, heartbeat_interval_seconds)
       WHERE id = ?`,
    ).run(
      info.spiffeId,
      info.agentVersion,
      info.svidExpiresAt,
      JSON.stringify(info.device),
      info.heartbeatIntervalSeconds ?? null,
      id,
    );
  }

  recordHeartbeat(
    id: string,
    at: string,
    hb: { seq: number; bootId?: string; svidExpiresAt: string; load?: [number, number, number] },
  ): void {
    this.touchRobot(id, at);
    const prev = this.stmt(
      "SELECT last_heartbeat_seq AS seq, heartbeat_boot_id AS boot FROM robots WHERE id = ?",
    ).get(id) as { seq: number | null; boot: string | null } | undefined;
    const sameBoot = hb.bootId !== undefined && prev?.boot === (hb.bootId ?? null) &&
      prev?.seq !== null && prev?.seq !== undefined;
    // QoS 1 may deliver a heartbeat twice: an old seq is a duplicate, not news.
    if (sameBoot && hb.seq <= prev!.seq!) return;
    const missing = sameBoot ? hb.seq - prev!.seq! - 1 : 0;
    this.stmt(
      `UPDATE robots SET last_heartbeat_seq = ?, heartbeat_boot_id = ?, svid_expires_at = ?,
         heartbeats_received = heartbeats_received + 1,
         heartbeats_missing = heartbeats_missing + ? WHERE id = ?`,
    ).run(hb.seq, hb.bootId ?? null, hb.svidExpiresAt, missing, id);
    if (hb.load) {
      const robot = this.getRobot(id);
      if (robot?.device) {
        this.stmt("UPDATE robots SET device = ? WHERE id = ?")
          .run(JSON.stringify({ ...robot.device, load: hb.load }), id);
      }
    }
  }

  /** Sets online/offline. Returns true when the value changed. */
  setOnline(id: string, online: boolean, reason: string | null): boolean {
    const before = this.getRobot(id);
    this.stmt("UPDATE robots SET online = ?, offline_reason = ? WHERE id = ?")
      .run(online ? 1 : 0, online ? null : reason, id);
    return before !== undefined && before.online !== online;
  }

  /** The `ts` of the newest status message applied, to ignore replays of older ones. */
  lastStatusTs(id: string): string | null {
    const r = this.stmt("SELECT last_status_ts FROM robots WHERE id = ?").get(id) as
      | Row
      | undefined;
    return r ? str(r.last_status_ts) : null;
  }

  setLastStatusTs(id: string, ts: string): void {
    this.stmt("UPDATE robots SET last_status_ts = ? WHERE id = ?").run(ts, id);
  }

  /** Sets the robot's current boot (from a register) and the order of its last status. */
  setStatusOrder(id: string, bootId: string | null, order: StatusOrder | null): void {
    this.stmt(
      "UPDATE robots SET boot_id = ?, status_connection = ?, status_rank = ? WHERE id = ?",
    ).run(bootId, order?.connection ?? null, order?.rank ?? null, id);
  }

  onlineRobots(): RobotRecord[] {
    return (this.stmt("SELECT * FROM robots WHERE online = 1 ORDER BY id").all() as Row[])
      .map(robotFromRow);
  }

  // ---- tasks ----

  createTask(t: NewTask): TaskRecord {
    this.stmt(
      `INSERT INTO tasks (id, robot_id, command, env, cwd, timeout_seconds, state, created_at,
         expires_at, updated_at, created_by)
       VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)`,
    ).run(
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
    );
    return this.getTask(t.id)!;
  }

  getTask(id: string): TaskRecord | undefined {
    const r = this.stmt("SELECT * FROM tasks WHERE id = ?").get(id) as Row | undefined;
    return r ? taskFromRow(r) : undefined;
  }

  listTasks(robotId: string, limit = 100): TaskRecord[] {
    return (this.stmt(
      "SELECT * FROM tasks WHERE robot_id = ? ORDER BY created_at DESC, id LIMIT ?",
    ).all(robotId, limit) as Row[]).map(taskFromRow);
  }

  /**
   * One page of tasks, newest first (created_at DESC, id DESC), optionally of one robot and in
   * one state. Keyset paging: a page starts strictly after `after`, so tasks created meanwhile
   * (newer than any cursor) never shift a page, and no task is repeated or skipped.
   */
  listTasksPage(q: TaskQuery): TaskRecord[] {
    const where: string[] = [];
    const params: (string | number)[] = [];
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
    const sql = `SELECT * FROM tasks${where.length ? ` WHERE ${where.join(" AND ")}` : ""}
      ORDER BY created_at DESC, id DESC LIMIT ?`;
    return (this.stmt(sql).all(...params) as Row[]).map(taskFromRow);
  }

  tasksInStates(states: TaskState[], robotId?: string): TaskRecord[] {
    const marks = states.map(() => "?").join(",");
    const sql = `SELECT * FROM tasks WHERE state IN (${marks})${
      robotId !== undefined ? " AND robot_id = ?" : ""
    } ORDER BY created_at, id`;
    const params = robotId !== undefined ? [...states, robotId] : states;
    return (this.stmt(sql).all(...params) as Row[]).map(taskFromRow);
  }

  countTasksByState(): Record<string, number> {
    const out: Record<string, number> = {};
    for (
      const r of this.stmt("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state")
        .all() as Row[]
    ) out[String(r.state)] = num(r.n) ?? 0;
    return out;
  }

  /**
   * Applies an event through the state machine, atomically. Results (exit code, output) are
   * written only when the transition is accepted, so a stale report never overwrites a result.
   */
  applyTaskEvent(
    id: string,
    event: TaskEvent,
    at: string,
    update: TaskUpdate = {},
  ): { task: TaskRecord; changed: boolean; ignored: boolean } | undefined {
    return this.transaction(() => {
      const task = this.getTask(id);
      if (!task) return undefined;
      const t = transition(task.state, event);
      if (t.ignored) return { task, changed: false, ignored: true };
      const sets: string[] = ["state = ?", "updated_at = ?"];
      const params: (string | number | null)[] = [t.to, at];
      const stamp = (col: string) => {
        sets.push(`${col} = COALESCE(${col}, ?)`);
        params.push(at);
      };
      if (event === "dispatch") {
        sets.push("dispatch_count = dispatch_count + 1", "dispatched_at = ?");
        params.push(at);
      }
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
      this.stmt(`UPDATE tasks SET ${sets.join(", ")} WHERE id = ?`).run(...params);
      return { task: this.getTask(id)!, changed: t.changed, ignored: false };
    });
  }
}

function userVersion(db: DatabaseSync): number {
  const r = db.prepare("PRAGMA user_version").get() as Row;
  return num(r.user_version) ?? 0;
}

function migrate(db: DatabaseSync, path: string): void {
  const current = userVersion(db);
  if (current > MIGRATIONS.length) {
    throw new Error(
      `${path}: registry schema version ${current} is newer than this k8s4r supports (${MIGRATIONS.length}); upgrade k8s4r`,
    );
  }
  for (let v = current; v < MIGRATIONS.length; v++) {
    db.exec("BEGIN IMMEDIATE");
    try {
      db.exec(MIGRATIONS[v]);
      db.exec(`PRAGMA user_version = ${v + 1}`);
      db.exec("COMMIT");
    } catch (err) {
      db.exec("ROLLBACK");
      throw new Error(`${path}: migration ${v + 1} failed: ${(err as Error).message}`);
    }
  }
}
