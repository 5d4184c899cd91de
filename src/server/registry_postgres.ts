/**
 * The PostgreSQL registry backend: `k8s4r server --database postgres://USER@HOST:PORT/DB` (or
 * `postgres://USER@/DB?host=/socket/dir` for a unix socket). The schema is the one numbered
 * list of schema.ts, applied under an advisory lock so that replicas starting at once migrate
 * once; `k8s4r_schema_migrations` records each version applied.
 *
 * Driver: `pg` (node-postgres) 8.23.1, pinned in deno.json. Checked under Deno 2.9.6 with
 * `npm:`: unix sockets and TCP, SCRAM-SHA-256, transactions and savepoints, named prepared
 * statements, its pool, SQLSTATE codes on errors (`err.code`). Chosen over `postgres`
 * (porsager) 3.4.9, which also runs here and has fewer round trips, because:
 * - pg sends parameters as untyped text and lets the server parse them by column type, which
 *   is what queries shared with SQLite need (1/0 into a BOOLEAN column). postgres.js serializes
 *   by the type it infers, and in our check it stored the number 1 into a BOOLEAN column as
 *   `false`, silently;
 * - an explicit client per transaction (`pool.connect()`, BEGIN, SAVEPOINT ..., COMMIT) maps one
 *   to one onto the batch of savepoints that acknowledgements rest on; no tagged-template API
 *   to route every query through;
 * - it is the most used PostgreSQL client for Node (what SQL tooling and examples assume).
 *
 * Secrets: the password comes from `--database-password-file` (0600) or the environment
 * (K8S4R_DATABASE_PASSWORD, PGPASSWORD), never from the URL (refused) or argv. The pool gets
 * it as a field, never inside a connection string; every message this module produces is
 * passed through `redactSecrets`. It is answered only in a form a stranger cannot use: SCRAM,
 * or cleartext/MD5 over TLS with `?sslmode=verify-full` (postgres_connect.ts); a server that
 * asks for it in cleartext on a plain connection is refused (it may be whoever took the port).
 */
// @ts-types="@types/pg"
import pg from "pg";
import {
  Registry,
  type Row,
  type SessionLock,
  type SqlBackend,
  type SqlConn,
  type SqlValue,
} from "./registry.ts";
import { MIGRATIONS, newerSchemaError } from "./schema.ts";
import { Turns } from "./turns.ts";
import { VERSION } from "../version.ts";
import {
  newClient,
  type PgEndpoint,
  poolConfig,
  SSL_MODES,
  type SslMode,
} from "./postgres_connect.ts";
import { readSecretFile } from "../fs/secret.ts";

/**
 * Where the registry lives (postgres_connect.ts `PgEndpoint`): host (or socket directory),
 * port, user, database, the password, and `sslmode` (`disable` or `verify-full`) with its
 * `sslrootcert`.
 */
export type PostgresConfig = PgEndpoint;

export const DEFAULT_PG_PORT = 5432;

/**
 * The server ends a statement after this (`statement_timeout`); the client gives up on an
 * answer a little later (`query_timeout`), so a PostgreSQL that does not answer at all (frozen,
 * SIGSTOP; a network that drops everything) fails the query instead of hanging the server: the
 * kernel completes TCP (and unix socket) handshakes and acknowledges keepalives for a stopped
 * process, so neither the connect nor TCP keepalive would ever notice.
 */
export const STATEMENT_TIMEOUT_MS = 30_000;
export const QUERY_TIMEOUT_MS = STATEMENT_TIMEOUT_MS + 5_000;

/** pg's error when `query_timeout` passed: that connection may still get the late answer. */
function queryTimedOut(err: unknown): boolean {
  return /Query read timeout/.test((err as Error | undefined)?.message ?? "");
}

/** Any advisory-lock key, as long as every k8s4r uses the same one ('k8s4rmig'). */
const MIGRATION_LOCK_KEY = "7725019788023474535";

/** Replaces passwords in connection strings, and the given secrets, by `***`. */
export function redactSecrets(text: string, secrets: (string | undefined)[] = []): string {
  let out = text
    .replace(/(postgres(?:ql)?:\/\/[^\s:/@]*):[^\s@/]*@/gi, "$1:***@")
    .replace(/([?&]password=)[^&\s]*/gi, "$1***");
  for (const s of secrets) if (s) out = out.split(s).join("***");
  return out;
}

const USAGE =
  "expected postgres://USER@HOST:PORT/DATABASE[?sslmode=verify-full&sslrootcert=CA.pem] or postgres://USER@/DATABASE?host=/socket/dir";
const PARAMS = ["host", "port", "sslmode", "sslrootcert"];

/**
 * Parses `--database`. Refuses a URL that carries a password: it would be in `ps`, in shell
 * history and in logs. Errors are one line and show the URL redacted.
 */
export function parseDatabaseUrl(raw: string, defaultUser: string): PostgresConfig {
  const shown = redactSecrets(raw);
  const bad = (why: string): never => {
    throw new Error(`--database: ${why} (got '${shown}')`);
  };
  // `postgres://user@/db?host=/dir` (libpq's socket form) has no host, which URL refuses
  // together with a user name: parse it with a stand-in host.
  const NO_HOST = "k8s4r-no-host.invalid";
  const hostless = /^(postgres(?:ql)?:\/\/(?:[^/?#@]*@)?)(?=[/?#]|$)/i;
  let u: URL;
  try {
    u = new URL(raw.replace(hostless, `$1${NO_HOST}`));
  } catch {
    return bad(USAGE);
  }
  if (u.protocol !== "postgres:" && u.protocol !== "postgresql:") bad(USAGE);
  if (u.password !== "" || u.searchParams.has("password")) {
    throw new Error(
      `--database: the URL contains a password ('${shown}'); remove it and give the password in a 0600 file with --database-password-file FILE, or in K8S4R_DATABASE_PASSWORD or PGPASSWORD`,
    );
  }
  for (const k of u.searchParams.keys()) {
    if (!PARAMS.includes(k)) bad(`unsupported parameter '${k}' (supported: ${PARAMS.join(", ")})`);
  }
  const dec = (s: string, what: string) => {
    try {
      return decodeURIComponent(s);
    } catch {
      return bad(`${what}: invalid percent-encoding`);
    }
  };
  let host = u.hostname === NO_HOST ? "" : dec(u.hostname, "host").replace(/^\[(.*)\]$/, "$1");
  const qHost = u.searchParams.get("host");
  if (qHost !== null) {
    if (host !== "") bad("give the host either before the path or as ?host=, not both");
    host = qHost;
  }
  if (host === "") bad(`no host: ${USAGE}`);
  if (host.includes("/") && !host.startsWith("/")) {
    bad(`host: a unix socket directory must be an absolute path, got '${host}'`);
  }
  const portText = u.port || u.searchParams.get("port") || String(DEFAULT_PG_PORT);
  const port = Number(portText);
  if (!/^\d{1,5}$/.test(portText) || port < 1 || port > 65535) {
    bad(`port: expected 1-65535, got '${portText}'`);
  }
  const database = dec(u.pathname.replace(/^\//, ""), "database");
  if (database === "" || database.includes("/")) bad(`no database name: ${USAGE}`);
  const user = dec(u.username, "user") || defaultUser;
  const config: PostgresConfig = { host, port, user, database };
  const mode = u.searchParams.get("sslmode");
  if (mode !== null) {
    if (!SSL_MODES.includes(mode as SslMode)) {
      bad(
        `sslmode: expected ${
          SSL_MODES.join(" or ")
        }, got '${mode}' (require and verify-ca do not check who answers)`,
      );
    }
    if (mode === "verify-full" && host.startsWith("/")) {
      bad("sslmode=verify-full: PostgreSQL has no TLS on a unix socket; use a host name");
    }
    if (mode === "verify-full") config.sslmode = mode; // disable: the default, not stored
  }
  const rootCert = u.searchParams.get("sslrootcert");
  if (rootCert !== null) {
    if (config.sslmode !== "verify-full") bad("sslrootcert: only with sslmode=verify-full");
    if (!rootCert.startsWith("/")) bad(`sslrootcert: expected an absolute path, got '${rootCert}'`);
    config.sslrootcert = rootCert;
  }
  return config;
}

/** The URL of a config, without its password: what logs and errors show. */
export function describePostgres(c: PostgresConfig): string {
  const user = encodeURIComponent(c.user);
  const db = encodeURIComponent(c.database);
  if (c.host.startsWith("/")) {
    return `postgres://${user}@/${db}?host=${c.host}${
      c.port !== DEFAULT_PG_PORT ? `&port=${c.port}` : ""
    }`;
  }
  const host = c.host.includes(":") ? `[${c.host}]` : c.host;
  const tls = c.sslmode === "verify-full"
    ? `?sslmode=verify-full${c.sslrootcert ? `&sslrootcert=${c.sslrootcert}` : ""}`
    : "";
  return `postgres://${user}@${host}:${c.port}/${db}${tls}`;
}

/**
 * The database password: `--database-password-file` (must not be readable by group or
 * others), else K8S4R_DATABASE_PASSWORD, else PGPASSWORD; undefined when none is set (peer or
 * trust authentication, or ~/.pgpass).
 */
export async function loadDatabasePassword(
  file: string | undefined,
  env: Record<string, string | undefined>,
): Promise<string | undefined> {
  if (file === undefined) {
    return env["K8S4R_DATABASE_PASSWORD"] || env["PGPASSWORD"] || undefined;
  }
  const text = (await readSecretFile(file, "database password file")).replace(/\r?\n$/, "");
  if (text === "") throw new Error(`${file}: database password file is empty`);
  return text;
}

/** A PostgreSQL error, redacted, with its SQLSTATE (`code`) kept for callers that retry. */
export class PostgresError extends Error {
  constructor(message: string, readonly code?: string) {
    super(message);
    this.name = "PostgresError";
  }
}

const INT8 = 20;
const TIMESTAMPTZ = 1184;
const parseTimestamptz = pg.types.getTypeParser(TIMESTAMPTZ, "text") as (s: string) => Date;

/**
 * Values as the shared queries expect them: BIGINT as a number (every one we store is a safe
 * integer), TIMESTAMPTZ as the ISO 8601 string it was written as (`Date#toISOString`).
 */
const TYPES = {
  getTypeParser: ((oid: number, format?: string) => {
    if (oid === INT8) return (s: string) => Number(s);
    if (oid === TIMESTAMPTZ) return (s: string) => parseTimestamptz(s).toISOString();
    return pg.types.getTypeParser(oid, format as "text");
  }) as typeof pg.types.getTypeParser,
};

/** `?` placeholders to `$1, $2...`, outside quoted strings and identifiers. */
export function numberPlaceholders(sql: string): string {
  let out = "";
  let n = 0;
  let quote: string | null = null;
  for (const ch of sql) {
    if (quote) {
      if (ch === quote) quote = null;
      out += ch;
    } else if (ch === "'" || ch === '"') {
      quote = ch;
      out += ch;
    } else if (ch === "?") {
      out += `$${++n}`;
    } else {
      out += ch;
    }
  }
  return out;
}

interface Prepared {
  name: string;
  text: string;
}

type Queryable = pg.Pool | pg.PoolClient;

class PgConn implements SqlConn {
  readonly dialect = "postgres" as const;
  constructor(private readonly q: Queryable, private readonly b: PostgresBackend) {}

  private async query(sql: string, params: SqlValue[]): Promise<pg.QueryResult<Row>> {
    const p = this.b.prepared(sql);
    try {
      return await this.q.query<Row>({ name: p.name, text: p.text, values: params });
    } catch (err) {
      throw this.b.wrap(err);
    }
  }
  async all(sql: string, params: SqlValue[] = []): Promise<Row[]> {
    return (await this.query(sql, params)).rows;
  }
  async get(sql: string, params: SqlValue[] = []): Promise<Row | undefined> {
    return (await this.query(sql, params)).rows[0];
  }
  async run(sql: string, params: SqlValue[] = []): Promise<number> {
    return (await this.query(sql, params)).rowCount ?? 0;
  }
  async exec(sql: string): Promise<void> {
    try {
      await this.q.query(sql);
    } catch (err) {
      throw this.b.wrap(err);
    }
  }
}

export interface PostgresOptions {
  /** Idle connections that fail (the server went away) are reported here. */
  onError?: (message: string) => void;
  /**
   * Connections in all. Default 4: one is the writer's alone (every write transaction of this
   * process, one at a time: the ingest batches, task writes, the sweeper), the others are
   * shared by reads (the HTTP API, dispatch). Reads can therefore never starve the writer.
   */
  maxConnections?: number;
}

class PostgresBackend implements SqlBackend {
  readonly dialect = "postgres" as const;
  readonly location: string;
  readonly #config: PostgresConfig;
  readonly #locks = new Set<pg.Client>();
  /** Reads. */
  readonly #pool: pg.Pool;
  /** The writer's own connection (write transactions run one at a time: `#writes`). */
  readonly #writer: pg.Pool;
  readonly #writes = new Turns();
  readonly #statements = new Map<string, Prepared>();
  readonly #secrets: (string | undefined)[];

  private readonly onError?: (message: string) => void;

  constructor(config: PostgresConfig, opts: PostgresOptions) {
    this.onError = opts.onError;
    this.location = describePostgres(config);
    this.#config = config;
    this.#secrets = [config.password];
    // Refuses to give the password away (cleartext/MD5 without verified TLS), TLS as
    // configured: postgres_connect.ts.
    const pool = (max: number, role: string) => {
      const p = new pg.Pool(poolConfig(config, {
        max,
        connectionTimeoutMillis: 10_000,
        idleTimeoutMillis: 30_000,
        // A connection whose peer vanished (a host gone, a cable pulled) is found out by TCP
        // keepalive in about 10 s + 9 probes, not the kernel's default of 2 hours.
        keepAlive: true,
        keepAliveInitialDelayMillis: 10_000,
        // Client-side bound on every query (see QUERY_TIMEOUT_MS).
        query_timeout: QUERY_TIMEOUT_MS,
        application_name: "k8s4r-server",
        // Server-side bounds: a stuck statement or a forgotten transaction cannot hold locks
        // forever (the batch fails, is not acknowledged, and is delivered again).
        options:
          `-c statement_timeout=${STATEMENT_TIMEOUT_MS} -c idle_in_transaction_session_timeout=60000`,
        types: TYPES,
      }));
      p.on("error", (err) => {
        opts.onError?.(
          `${this.location}: idle ${role} connection failed: ${this.wrap(err).message}`,
        );
      });
      return p;
    };
    // A flood of reads (600 concurrent /healthz over 3000 robots did) used to take every
    // connection of one shared pool, and the ingest write then failed after 10 s waiting for
    // one ("timeout exceeded when trying to connect"): the writer has a pool of its own.
    this.#writer = pool(1, "writer");
    this.#pool = pool(Math.max(1, (opts.maxConnections ?? 4) - 1), "read");
  }

  /** One name per SQL text: each pooled connection prepares it on first use, then reuses it. */
  prepared(sql: string): Prepared {
    let p = this.#statements.get(sql);
    if (!p) {
      p = { name: `k8s4r_${this.#statements.size + 1}`, text: numberPlaceholders(sql) };
      this.#statements.set(sql, p);
    }
    return p;
  }

  wrap(err: unknown): PostgresError {
    if (err instanceof PostgresError) return err;
    const e = err as Error & { code?: string };
    const code = typeof e?.code === "string" && /^[0-9A-Z]{5}$/.test(e.code) ? e.code : undefined;
    const msg = redactSecrets(e?.message ?? String(err), this.#secrets);
    return new PostgresError(
      `${this.location}: ${msg}${code ? ` (SQLSTATE ${code})` : ""}`,
      e?.code,
    );
  }

  /**
   * A pooled client for a transaction. While it is checked out the pool does not listen for
   * its errors: a connection that drops between two statements (the server stopped) would
   * throw an uncaught 'error'; it is logged here, and the next statement fails with it.
   */
  async connect(): Promise<pg.PoolClient> {
    try {
      const client = await this.#writer.connect();
      const onError = (err: Error) => this.onError?.(`${this.location}: ${this.wrap(err).message}`);
      client.on("error", onError);
      const release = client.release.bind(client);
      client.release = (e?: Error | boolean) => {
        client.off("error", onError);
        return release(e);
      };
      return client;
    } catch (err) {
      const w = this.wrap(err);
      throw new PostgresError(
        w.message.replace(`${this.location}: `, `${this.location}: cannot connect: `),
        w.code,
      );
    }
  }

  read<T>(fn: (c: SqlConn) => Promise<T>): Promise<T> {
    return fn(new PgConn(this.#pool, this));
  }

  transaction<T>(fn: (c: SqlConn) => Promise<T>): Promise<T> {
    return this.#writes.run(() => this.inTransaction(fn));
  }

  private async inTransaction<T>(fn: (c: SqlConn) => Promise<T>): Promise<T> {
    const client = await this.connect();
    // The driver's own errors (BEGIN, COMMIT) are wrapped here; statements are wrapped by
    // PgConn; anything else `fn` throws (ConflictError...) is the caller's and passes as is.
    const q = async (sql: string) => {
      try {
        await client.query(sql);
      } catch (err) {
        throw this.wrap(err);
      }
    };
    return await withTransaction(client, () => fn(new PgConn(client, this)), q);
  }

  async migrate(): Promise<void> {
    const client = await this.connect();
    let refused: Error | undefined;
    let v = 0;
    try {
      await withTransaction(client, async () => {
        // Replicas starting at once: the first migrates, the others wait here and find nothing
        // to do. The lock ends with the transaction.
        await client.query("SELECT pg_advisory_xact_lock($1::bigint)", [MIGRATION_LOCK_KEY]);
        await client.query(
          `CREATE TABLE IF NOT EXISTS k8s4r_schema_migrations (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             k8s4r_version TEXT
           )`,
        );
        const r = await client.query<{ v: number }>(
          "SELECT CAST(COALESCE(MAX(version), 0) AS INTEGER) AS v FROM k8s4r_schema_migrations",
        );
        const current = r.rows[0].v;
        if (current > MIGRATIONS.length) {
          refused = newerSchemaError(this.location, current);
          throw refused;
        }
        for (v = current; v < MIGRATIONS.length; v++) {
          await client.query(MIGRATIONS[v].postgres);
          await client.query(
            "INSERT INTO k8s4r_schema_migrations (version, k8s4r_version) VALUES ($1, $2)",
            [v + 1, VERSION],
          );
        }
      });
    } catch (err) {
      if (err === refused) throw err;
      const w = this.wrap(err);
      throw new PostgresError(
        w.message.replace(`${this.location}: `, `${this.location}: migration ${v + 1} failed: `),
        w.code,
      );
    }
  }

  async schemaVersion(): Promise<number> {
    const r = await new PgConn(this.#pool, this).get(
      "SELECT CAST(COALESCE(MAX(version), 0) AS INTEGER) AS v FROM k8s4r_schema_migrations",
    );
    return Number(r?.v ?? 0);
  }

  async durability(): Promise<Record<string, string>> {
    const c = new PgConn(this.#pool, this);
    const out: Record<string, string> = {};
    for (const k of ["server_version", "synchronous_commit", "fsync"]) {
      const r = await c.get(`SELECT current_setting('${k}') AS v`);
      out[k] = String(r?.v);
    }
    return out;
  }

  /**
   * `pg_try_advisory_lock(key)` on a connection of its own, outside the pool: the lock lives as
   * long as that session, so a process that dies (or loses the database) loses it, and another
   * process can take it at once. Undefined when another session holds it.
   */
  async tryLock(key: string): Promise<SessionLock | undefined> {
    // The pools' rules (postgres_connect.ts: no password in cleartext, TLS as configured).
    const client = newClient(this.#config, {
      connectionTimeoutMillis: 5_000,
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
      query_timeout: QUERY_TIMEOUT_MS,
      application_name: "k8s4r-server-lock",
      types: TYPES,
    });
    let alive = true;
    client.on("error", () => (alive = false));
    client.on("end", () => (alive = false));
    try {
      await client.connect();
      const r = await client.query<{ ok: boolean }>(
        "SELECT pg_try_advisory_lock($1::bigint) AS ok",
        [key],
      );
      if (r.rows[0]?.ok !== true) {
        await client.end().catch(() => {});
        return undefined;
      }
    } catch (err) {
      await client.end().catch(() => {});
      throw this.wrap(err);
    }
    this.#locks.add(client);
    return {
      held: () => alive,
      release: async () => {
        alive = false;
        this.#locks.delete(client);
        await client.end().catch(() => {});
      },
    };
  }

  async close(): Promise<void> {
    for (const c of this.#locks) await c.end().catch(() => {});
    this.#locks.clear();
    await Promise.all([this.#pool.end(), this.#writer.end()]);
  }
}

/** Connects, migrates, and returns the registry. Errors name the redacted URL. */
export async function openPostgresRegistry(
  config: PostgresConfig,
  opts: PostgresOptions = {},
): Promise<Registry> {
  const backend = new PostgresBackend(config, opts);
  try {
    await backend.migrate();
  } catch (err) {
    await backend.close().catch(() => {});
    throw err;
  }
  return new Registry(backend);
}

/**
 * BEGIN, `body`, COMMIT on one pooled connection, then its release. On an error it rolls back,
 * except after a query timeout: the connection may still get its answer later (and a ROLLBACK
 * would wait as long). A connection that timed out or could not roll back is released broken,
 * so the pool never reuses it. `run` sends BEGIN and COMMIT (a caller may wrap their errors).
 */
async function withTransaction<T>(
  client: pg.PoolClient,
  body: () => Promise<T>,
  run: (sql: string) => Promise<unknown> = (sql) => client.query(sql),
): Promise<T> {
  let broken: Error | undefined;
  try {
    await run("BEGIN");
    const r = await body();
    await run("COMMIT");
    return r;
  } catch (err) {
    if (queryTimedOut(err)) broken = err as Error;
    else {
      try {
        await client.query("ROLLBACK");
      } catch (e) {
        broken = e as Error; // the connection is gone
      }
    }
    throw err;
  } finally {
    client.release(broken);
  }
}
