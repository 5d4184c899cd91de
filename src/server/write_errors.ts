/**
 * Which registry write errors are about the message being written ("permanent": this message
 * can never be written, however often the broker delivers it) and which are about the database
 * (temporary: try again, the message is not acknowledged and comes back).
 *
 * A permanent error must not stop ingest: the fleet server drops that one message, counts it
 * (`registryRefused`, the `registry-refused` drop reason) and logs it, as it does a malformed
 * payload, and goes on with the ones after it. A temporary one keeps the message for later.
 *
 * - PostgreSQL, by SQLSTATE class: 22 (data exception: out of range, bad value), 23 (integrity
 *   constraint), 42 (syntax or access rule) are permanent, except the class-42 codes that name
 *   the database's set-up rather than the message (a missing privilege, table, column, function
 *   or object: an operator or a migration fixes those, and every message would fail alike).
 *   Everything else (08 connection, 25006 read-only transaction, 40 deadlock or serialization,
 *   53 resources, 57 operator intervention, XX internal, no code at all) is temporary.
 * - SQLite (node:sqlite's `errcode`, its primary code in the low byte): CONSTRAINT (19),
 *   MISMATCH (20), TOOBIG (18) and RANGE (25) are permanent; FULL, IOERR, BUSY, READONLY... are
 *   not.
 */

const PG_PERMANENT_CLASSES = new Set(["22", "23", "42"]);
const PG_SETUP_CODES = new Set(["42501", "42P01", "42703", "42883", "42704"]);
const SQLITE_PERMANENT = new Set([18, 19, 20, 25]);

/** The SQLSTATE of a PostgreSQL error (registry_postgres.ts `PostgresError.code`). */
function sqlState(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && /^[0-9A-Z]{5}$/.test(code) ? code : undefined;
}

function sqliteCode(err: unknown): number | undefined {
  const e = err as { code?: unknown; errcode?: unknown } | null;
  return e?.code === "ERR_SQLITE_ERROR" && typeof e.errcode === "number" ? e.errcode : undefined;
}

/** True when the database refused the statement for what the message holds. */
export function isPermanentWriteError(err: unknown): boolean {
  const state = sqlState(err);
  if (state !== undefined) {
    return PG_PERMANENT_CLASSES.has(state.slice(0, 2)) && !PG_SETUP_CODES.has(state);
  }
  const lite = sqliteCode(err);
  return lite !== undefined && SQLITE_PERMANENT.has(lite & 0xff);
}

/** How a permanent error names itself in the log: its SQLSTATE or SQLite code. */
export function writeErrorCode(err: unknown): string | undefined {
  const state = sqlState(err);
  if (state !== undefined) return `SQLSTATE ${state}`;
  const lite = sqliteCode(err);
  return lite !== undefined ? `SQLite ${lite}` : undefined;
}

/** The state of the registry's writes: failing since when, with which error. */
export interface WriteState {
  ok: boolean;
  /** When the current run of failures began (ISO), while failing. */
  failingSince?: string;
  /** The last failure (detailed view only). */
  lastError?: string;
  /** Its SQLSTATE or SQLite code, when it has one. */
  code?: string;
}

/**
 * Remembers whether the registry's writes succeed. `FleetService` reports each batch of robot
 * messages it writes: a failure stays until a batch commits again (the failed message is
 * redelivered after every reconnect, about once a second, so a recovered database is seen at
 * its next attempt).
 */
export class WriteHealth {
  #since?: number;
  #error?: string;
  #code?: string;

  constructor(private readonly now: () => number = Date.now) {}

  failed(err: unknown): void {
    if (this.#since === undefined) this.#since = this.now();
    this.#error = err instanceof Error ? err.message : String(err);
    this.#code = writeErrorCode(err);
  }

  succeeded(): void {
    this.#since = undefined;
    this.#error = undefined;
    this.#code = undefined;
  }

  state(): WriteState {
    if (this.#since === undefined) return { ok: true };
    return {
      ok: false,
      failingSince: new Date(this.#since).toISOString(),
      lastError: this.#error,
      ...(this.#code ? { code: this.#code } : {}),
    };
  }
}
