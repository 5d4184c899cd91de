/**
 * The registry schema, one numbered list for both backends: entry i moves a database from
 * version i to i+1, with the SQL of each dialect side by side, so that a change cannot be made
 * to one backend and forgotten in the other. Never edit an entry that has shipped: append one.
 *
 * - SQLite records the version in `PRAGMA user_version` (registry_sqlite.ts).
 * - PostgreSQL records each applied version in `k8s4r_schema_migrations` (registry_postgres.ts),
 *   under an advisory lock, in the same transaction as the migration. Each entry runs inside
 *   that transaction: no `CREATE INDEX CONCURRENTLY` (it cannot run in one).
 *
 * Column types. The queries (registry.ts) are written once for both dialects, so:
 * - Booleans are written as 1/0 parameters: SQLite stores INTEGER, PostgreSQL parses '1'/'0'
 *   as BOOLEAN (the pg driver sends parameters as untyped text).
 * - Times the server generates are ISO 8601 strings; PostgreSQL keeps them as TIMESTAMPTZ (the
 *   driver reads them back as the same ISO strings). Times a robot sends (`ts`, SVID expiry)
 *   stay TEXT in both: exactly what the robot said.
 * - Every integer a robot controls (seq, connection) is BIGINT on PostgreSQL: a value SQLite
 *   accepts must not fail there (a failing write is never acknowledged, so it would come back).
 * - Text keys that are sorted (ids) are COLLATE "C" on PostgreSQL, so that they sort as in
 *   SQLite (bytewise) whatever the database's locale.
 * - JSON (device, command, env) is TEXT in both: returned byte for byte as stored.
 */
export interface Migration {
  sqlite: string;
  postgres: string;
}

export const MIGRATIONS: Migration[] = [
  // 1: robots and tasks.
  {
    sqlite: `CREATE TABLE robots (
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
    postgres: `CREATE TABLE robots (
       id TEXT COLLATE "C" PRIMARY KEY,
       spiffe_id TEXT,
       first_seen TIMESTAMPTZ NOT NULL,
       last_seen TIMESTAMPTZ NOT NULL,
       online BOOLEAN NOT NULL DEFAULT FALSE,
       offline_reason TEXT,
       last_status_ts TEXT,
       device TEXT,
       svid_expires_at TEXT,
       agent_version TEXT,
       heartbeat_interval_seconds INTEGER,
       last_heartbeat_seq BIGINT
     );
     CREATE TABLE tasks (
       id TEXT COLLATE "C" PRIMARY KEY,
       robot_id TEXT COLLATE "C" NOT NULL,
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
       created_at TIMESTAMPTZ NOT NULL,
       expires_at TIMESTAMPTZ NOT NULL,
       dispatched_at TIMESTAMPTZ,
       accepted_at TIMESTAMPTZ,
       started_at TIMESTAMPTZ,
       finished_at TIMESTAMPTZ,
       updated_at TIMESTAMPTZ NOT NULL
     );
     CREATE INDEX tasks_robot_state ON tasks (robot_id, state);
     CREATE INDEX tasks_state ON tasks (state);`,
  },
  // 2: heartbeat accounting: how many arrived, and how many were lost (gaps in seq per boot).
  {
    sqlite: `ALTER TABLE robots ADD COLUMN heartbeat_boot_id TEXT;
     ALTER TABLE robots ADD COLUMN heartbeats_received INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE robots ADD COLUMN heartbeats_missing INTEGER NOT NULL DEFAULT 0;`,
    postgres: `ALTER TABLE robots ADD COLUMN heartbeat_boot_id TEXT;
     ALTER TABLE robots ADD COLUMN heartbeats_received BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE robots ADD COLUMN heartbeats_missing BIGINT NOT NULL DEFAULT 0;`,
  },
  // 3: status ordering without clocks (docs/PROTOCOL.md): the boot of the last register, and the
  // (connection, rank) of the last status applied (rank 0 online, 1 offline).
  {
    sqlite: `ALTER TABLE robots ADD COLUMN boot_id TEXT;
     ALTER TABLE robots ADD COLUMN status_connection INTEGER;
     ALTER TABLE robots ADD COLUMN status_rank INTEGER;`,
    postgres: `ALTER TABLE robots ADD COLUMN boot_id TEXT;
     ALTER TABLE robots ADD COLUMN status_connection BIGINT;
     ALTER TABLE robots ADD COLUMN status_rank SMALLINT;`,
  },
  // 4: operators (issue 11): who created a task (the SPIFFE ID of its operator), who asked to
  // cancel it and when; indexes for the cursor-paged task list (newest first, keyset on
  // (created_at, id), per robot and per state).
  {
    sqlite: `ALTER TABLE tasks ADD COLUMN created_by TEXT;
     ALTER TABLE tasks ADD COLUMN cancel_requested_at TEXT;
     ALTER TABLE tasks ADD COLUMN cancel_requested_by TEXT;
     CREATE INDEX tasks_created ON tasks (created_at, id);
     CREATE INDEX tasks_robot_created ON tasks (robot_id, created_at, id);
     CREATE INDEX tasks_state_created ON tasks (state, created_at, id);`,
    postgres: `ALTER TABLE tasks ADD COLUMN created_by TEXT;
     ALTER TABLE tasks ADD COLUMN cancel_requested_at TIMESTAMPTZ;
     ALTER TABLE tasks ADD COLUMN cancel_requested_by TEXT;
     CREATE INDEX tasks_created ON tasks (created_at, id);
     CREATE INDEX tasks_robot_created ON tasks (robot_id, created_at, id);
     CREATE INDEX tasks_state_created ON tasks (state, created_at, id);`,
  },
  // 5: replicas (issue 13). Heartbeats of one robot may be applied out of order (a shared
  // subscription splits them across replicas): a window of the seqs received below the highest
  // (hex bitmap, bit i = seq max - i) and the lowest seq of the boot, so that a late one fills
  // its gap instead of being taken for a duplicate. Task dispatch claims (which replica is
  // publishing a task, until when). The replicas' leases and probe clocks (PostgreSQL only in
  // use; the table exists in both so the schemas stay one list).
  {
    sqlite: `ALTER TABLE robots ADD COLUMN heartbeat_window TEXT;
     ALTER TABLE robots ADD COLUMN heartbeat_low_seq INTEGER;
     ALTER TABLE tasks ADD COLUMN dispatch_owner TEXT;
     ALTER TABLE tasks ADD COLUMN dispatch_lease_until TEXT;
     CREATE TABLE replicas (
       client_id TEXT PRIMARY KEY,
       instance TEXT NOT NULL,
       started_at TEXT NOT NULL,
       lease_until TEXT NOT NULL,
       confirmed_at TEXT NOT NULL,
       link_up INTEGER NOT NULL DEFAULT 0,
       adopted_by TEXT,
       updated_at TEXT NOT NULL
     );`,
    postgres: `ALTER TABLE robots ADD COLUMN heartbeat_window TEXT;
     ALTER TABLE robots ADD COLUMN heartbeat_low_seq BIGINT;
     ALTER TABLE tasks ADD COLUMN dispatch_owner TEXT;
     ALTER TABLE tasks ADD COLUMN dispatch_lease_until TIMESTAMPTZ;
     CREATE TABLE replicas (
       client_id TEXT COLLATE "C" PRIMARY KEY,
       instance TEXT NOT NULL,
       started_at TIMESTAMPTZ NOT NULL,
       lease_until TIMESTAMPTZ NOT NULL,
       confirmed_at TIMESTAMPTZ NOT NULL,
       link_up BOOLEAN NOT NULL DEFAULT FALSE,
       adopted_by TEXT,
       updated_at TIMESTAMPTZ NOT NULL
     );`,
  },
  // 6: robots keep no broker session while away (docs/PROTOCOL.md, "Robot side"): a robot's new
  // connection asks for its undelivered tasks again; one whose publish is in flight under a
  // claim (that publish may have reached the broker before the robot subscribed) is marked, and
  // its claim holder publishes it again after the PUBACK (a claim replaces the mark with
  // RESEND_CLAIMED, which the recorded PUBACK clears: registry.ts `claimTasks`).
  {
    sqlite: `ALTER TABLE tasks ADD COLUMN resend_requested_at TEXT;`,
    postgres: `ALTER TABLE tasks ADD COLUMN resend_requested_at TIMESTAMPTZ;`,
  },
];

export const SCHEMA_VERSION = MIGRATIONS.length;

/** The refusal both backends give for a database written by a newer k8s4r. */
export function newerSchemaError(location: string, found: number): Error {
  return new Error(
    `${location}: registry schema version ${found} is newer than this k8s4r supports (${SCHEMA_VERSION}); upgrade k8s4r`,
  );
}
