/**
 * The SQLite registry backend (`node:sqlite`): the embedded default, `<data-dir>/registry.sqlite`.
 * Schema versions are recorded in `PRAGMA user_version`; a database written by a newer k8s4r is
 * refused rather than corrupted.
 *
 * One connection serves everything, so every use of it (a read, a transaction, a batch) takes
 * its turn: async callers never see another caller's uncommitted writes, and never write into
 * another caller's open transaction.
 */
import { DatabaseSync, type StatementSync } from "node:sqlite";
import { join } from "node:path";
import { Registry, type Row, type SqlBackend, type SqlConn, type SqlValue } from "./registry.ts";
import { MIGRATIONS, newerSchemaError } from "./schema.ts";
import { Turns } from "./turns.ts";

export const DB_FILE = "registry.sqlite";

/**
 * Opens (creating if needed) `<dataDir>/registry.sqlite` and migrates it. The registry holds
 * the fleet's robots and tasks (their commands, output and environment): the file and its
 * `-wal`/`-shm` are the owner's alone (0600), whatever the umask or the mode of an existing data
 * dir (SQLite gives `-wal`/`-shm` the database file's mode). A data dir that group or others
 * may write to is refused: they could replace the files.
 */
export async function openSqliteRegistry(dataDir: string): Promise<Registry> {
  await Deno.mkdir(dataDir, { recursive: true, mode: 0o700 });
  const st = await Deno.stat(dataDir);
  if (st.mode !== null && (st.mode & 0o022) !== 0) {
    throw new Error(
      `${dataDir}: the registry's data dir is writable by group or others (mode ${
        (st.mode & 0o7777).toString(8)
      }); run chmod go-w ${dataDir}`,
    );
  }
  const path = join(dataDir, DB_FILE);
  // Created 0600 before SQLite opens it (SQLite would create it 0644 under the usual umask).
  (await Deno.open(path, { create: true, write: true, mode: 0o600 })).close();
  for (const f of [path, `${path}-wal`, `${path}-shm`]) {
    try {
      const m = (await Deno.stat(f)).mode;
      if (m !== null && (m & 0o077) !== 0) await Deno.chmod(f, m & 0o700);
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
    }
  }
  return openSqliteFile(path);
}

/** `:memory:` is accepted, for unit tests. */
export function openSqliteFile(path: string): Registry {
  return new Registry(SqliteBackend.open(path));
}

class SqliteConn implements SqlConn {
  readonly dialect = "sqlite" as const;
  // Compiling SQL costs more than running it: every statement is prepared once and reused.
  readonly #stmts = new Map<string, StatementSync>();
  constructor(private readonly db: DatabaseSync) {}

  private stmt(sql: string): StatementSync {
    let st = this.#stmts.get(sql);
    if (!st) {
      st = this.db.prepare(sql);
      this.#stmts.set(sql, st);
    }
    return st;
  }

  all(sql: string, params: SqlValue[] = []): Promise<Row[]> {
    return Promise.resolve(this.stmt(sql).all(...params) as Row[]);
  }
  get(sql: string, params: SqlValue[] = []): Promise<Row | undefined> {
    return Promise.resolve(this.stmt(sql).get(...params) as Row | undefined);
  }
  run(sql: string, params: SqlValue[] = []): Promise<number> {
    return Promise.resolve(Number(this.stmt(sql).run(...params).changes));
  }
  exec(sql: string): Promise<void> {
    this.db.exec(sql);
    return Promise.resolve();
  }
  clear(): void {
    this.#stmts.clear();
  }
}

class SqliteBackend implements SqlBackend {
  readonly dialect = "sqlite" as const;
  readonly #conn: SqliteConn;
  readonly #turns = new Turns();

  private constructor(private readonly db: DatabaseSync, readonly location: string) {
    this.#conn = new SqliteConn(db);
  }

  static open(path: string): SqliteBackend {
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
    return new SqliteBackend(db, path);
  }

  read<T>(fn: (c: SqlConn) => Promise<T>): Promise<T> {
    return this.#turns.run(() => fn(this.#conn));
  }

  transaction<T>(fn: (c: SqlConn) => Promise<T>): Promise<T> {
    return this.#turns.run(async () => {
      // IMMEDIATE takes the write lock up front, so a read-then-write cannot race another writer
      // (another process on the same file).
      this.db.exec("BEGIN IMMEDIATE");
      try {
        const r = await fn(this.#conn);
        this.db.exec("COMMIT");
        return r;
      } catch (err) {
        // A failed COMMIT may already have rolled back (SQLITE_FULL, SQLITE_IOERR).
        if (this.db.isTransaction) this.db.exec("ROLLBACK");
        throw err;
      }
    });
  }

  schemaVersion(): Promise<number> {
    return this.#turns.run(() => Promise.resolve(userVersion(this.db)));
  }

  durability(): Promise<Record<string, string>> {
    return this.#turns.run(() => {
      const j = this.db.prepare("PRAGMA journal_mode").get() as Row;
      const s = this.db.prepare("PRAGMA synchronous").get() as Row;
      // synchronous: 2 = FULL. NORMAL (1) in WAL mode syncs only at checkpoints.
      return Promise.resolve({
        journal_mode: String(j.journal_mode),
        synchronous: String(s.synchronous),
      });
    });
  }

  close(): Promise<void> {
    return this.#turns.run(() => {
      this.#conn.clear();
      if (this.db.isOpen) this.db.close();
      return Promise.resolve();
    });
  }
}

function userVersion(db: DatabaseSync): number {
  const r = db.prepare("PRAGMA user_version").get() as Row;
  return Number(r.user_version ?? 0);
}

/**
 * Applies the missing migrations in one write transaction. The version is read inside it, so
 * two processes opening the same new file at once cannot both apply migration 1.
 */
function migrate(db: DatabaseSync, path: string): void {
  db.exec("BEGIN IMMEDIATE");
  const current = userVersion(db);
  if (current > MIGRATIONS.length) {
    db.exec("ROLLBACK");
    throw newerSchemaError(path, current);
  }
  let v = current;
  try {
    for (; v < MIGRATIONS.length; v++) db.exec(MIGRATIONS[v].sqlite);
    if (current !== MIGRATIONS.length) db.exec(`PRAGMA user_version = ${MIGRATIONS.length}`);
    db.exec("COMMIT");
  } catch (err) {
    if (db.isTransaction) db.exec("ROLLBACK");
    throw new Error(`${path}: migration ${v + 1} failed: ${(err as Error).message}`);
  }
}
