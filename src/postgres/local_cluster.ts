/**
 * A private PostgreSQL cluster in a directory, for the development stack (`devenv start --ha`):
 * `initdb`, the `postgres` daemon's argv (started
 * through the one process helper, with a pid file like every other daemon), its readiness (the
 * status line PostgreSQL writes into `postmaster.pid`), SQL through `psql` on its unix socket,
 * and dumps through `pg_dump`/`pg_restore`. A production PostgreSQL is the operator's: k8s4r
 * only connects to it.
 *
 * - Listens on a unix socket only (`listen_addresses = ''`), in a directory of its own that
 *   only the user who started devenv can enter (0700, `.dev-env/postgres`), and the socket
 *   itself is 0700: no other local user can connect, and none can stand in for the server while
 *   it is down (a TCP port is anyone's to take then, and a client that retries every second
 *   would hand its password to whoever did). `scram-sha-256` for every connection anyway.
 * - Passwords never reach argv, the environment of a daemon, or a log: initdb reads the
 *   superuser's from a 0600 file, the tools find theirs in a 0600 pgpass file (`PGPASSFILE`),
 *   and roles are created with a SCRAM verifier (`scramVerifier`), so even a statement that
 *   PostgreSQL logs on an error carries no password.
 * - PostgreSQL refuses to run as root. Run as root, its binaries run in a user namespace that
 *   maps root to the `postgres` user's uid (`unshare --user --map-user`): PostgreSQL sees an
 *   unprivileged user, and its files stay those of the user who started devenv, under a 0700
 *   directory, like every other devenv file. Run as anyone else, they run as that user.
 *
 * `cluster.ts` beside it is the tests' cluster (pg_ctl, `runuser`, tests/helpers/postgres.ts),
 * written at the same time for the registry; devenv needs a daemon under the process helper
 * (pid file, `devenv stop`) in a 0700 `.dev-env`, which `runuser` cannot reach. To be unified.
 */
import { Buffer } from "node:buffer";
import { createHash, createHmac, pbkdf2Sync, randomBytes } from "node:crypto";
import { join } from "node:path";
import { CliError } from "../cli/errors.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
import type { ProcessRunner } from "../process/mod.ts";

export const PG_MAJOR = 15;

export interface PgBinaries {
  dir: string;
  initdb: string;
  postgres: string;
  psql: string;
  pgDump: string;
  pgRestore: string;
  /** `15.18`. */
  version: string;
}

/**
 * PostgreSQL's binaries: `$K8S4R_PG_BINDIR`, else Debian's `/usr/lib/postgresql/15/bin`, else
 * the newest `/usr/lib/postgresql/N/bin`. The error says what to install.
 */
export async function findPgBinaries(
  runner: ProcessRunner,
  env: Record<string, string | undefined>,
): Promise<PgBinaries> {
  const candidates: string[] = [];
  if (env["K8S4R_PG_BINDIR"]) candidates.push(env["K8S4R_PG_BINDIR"]);
  candidates.push(`/usr/lib/postgresql/${PG_MAJOR}/bin`);
  try {
    const majors = [...Deno.readDirSync("/usr/lib/postgresql")]
      .filter((e) => /^\d+$/.test(e.name)).map((e) => Number(e.name)).sort((a, b) => b - a);
    for (const m of majors) candidates.push(`/usr/lib/postgresql/${m}/bin`);
  } catch { /* no Debian layout */ }
  for (const dir of candidates) {
    try {
      if (!Deno.statSync(join(dir, "initdb")).isFile) continue;
    } catch {
      continue;
    }
    const out = await runner.output(join(dir, "postgres"), ["--version"], { timeoutMs: 10_000 });
    return {
      dir,
      initdb: join(dir, "initdb"),
      postgres: join(dir, "postgres"),
      psql: join(dir, "psql"),
      pgDump: join(dir, "pg_dump"),
      pgRestore: join(dir, "pg_restore"),
      version: /(\d+(?:\.\d+)*)/.exec(out.stdout)?.[1] ?? "unknown",
    };
  }
  throw new CliError(
    `PostgreSQL not found: no initdb in ${candidates.join(", ")}`,
    1,
    `install it (apt-get install postgresql-${PG_MAJOR}) or set K8S4R_PG_BINDIR`,
  );
}

/**
 * What runs a PostgreSQL binary: nothing for an unprivileged user; for root, a user namespace
 * in which root is the `postgres` user's uid (65534 when there is none), since PostgreSQL
 * refuses uid 0. `unshare` execs the binary, so a daemon's pid is PostgreSQL's own.
 */
export function unprivilegedPrefix(uid = Deno.uid()): string[] {
  if (uid !== 0) return [];
  let ids = ["65534", "65534"];
  try {
    const line = Deno.readTextFileSync("/etc/passwd").split("\n")
      .find((l) => l.startsWith("postgres:"));
    if (line) ids = [line.split(":")[2], line.split(":")[3]];
  } catch { /* no passwd file: nobody */ }
  return ["unshare", "--user", `--map-user=${ids[0]}`, `--map-group=${ids[1]}`, "--"];
}

/** `[cmd, args]` of a PostgreSQL binary run through `unprivilegedPrefix`. */
export function pgCommand(bin: string, args: string[], uid = Deno.uid()): [string, string[]] {
  const argv = [...unprivilegedPrefix(uid), bin, ...args];
  return [argv[0], argv.slice(1)];
}

/** A random password of hex digits: nothing in it needs quoting in SQL, libpq or HCL. */
export function randomPassword(bytes = 24): string {
  return randomBytes(bytes).toString("hex");
}

/**
 * PostgreSQL's SCRAM-SHA-256 verifier of a password (RFC 5802/7677, as `CREATE ROLE ...
 * PASSWORD 'SCRAM-SHA-256$...'` accepts it): the server stores exactly this, and a log of the
 * statement reveals no password.
 */
export function scramVerifier(password: string, salt = randomBytes(16), iterations = 4096): string {
  const salted = pbkdf2Sync(password.normalize("NFKC"), salt, iterations, 32, "sha256");
  const clientKey = createHmac("sha256", salted).update("Client Key").digest();
  const storedKey = createHash("sha256").update(clientKey).digest();
  const serverKey = createHmac("sha256", salted).update("Server Key").digest();
  const b64 = (b: Uint8Array) => Buffer.from(b).toString("base64");
  return `SCRAM-SHA-256$${iterations}:${b64(salt)}$${b64(storedKey)}:${b64(serverKey)}`;
}

/**
 * Where and as whom to connect; the password is never in here, only in files. `host` is the
 * directory of the server's unix socket (an absolute path; the socket is `.s.PGSQL.<port>` in
 * it), or a host name for a remote server.
 */
export interface PgTarget {
  host: string;
  port: number;
  user: string;
  database: string;
}

/** The longest unix socket path Linux takes (`sun_path`, less its NUL). */
export const MAX_SOCKET_PATH = 107;

/** The path of the socket a server on `port` makes in `dir`. */
export function socketPath(dir: string, port: number): string {
  return join(dir, `.s.PGSQL.${port}`);
}

/** One line of a pgpass file (`host:port:db:user:password`, `:` and `\` escaped). */
export function pgpassLine(t: PgTarget, password: string): string {
  const esc = (s: string) => s.replaceAll("\\", "\\\\").replaceAll(":", "\\:");
  return `${esc(t.host)}:${t.port}:*:${esc(t.user)}:${esc(password)}\n`;
}

/**
 * A libpq keyword/value connection string (what SPIRE's `connection_string` takes; SPIRE's pgx
 * reads `host=/dir` as the socket directory, as libpq does). On a unix socket there is no TLS
 * (libpq and pgx ignore sslmode there); to a host name it is `sslmode=verify-full`, never a
 * plain connection that whoever answers at the address could read.
 */
export function keywordValue(t: PgTarget, password?: string): string {
  const q = (s: string) => `'${s.replaceAll("\\", "\\\\").replaceAll("'", "\\'")}'`;
  return [
    `host=${q(t.host)}`,
    `port=${t.port}`,
    `user=${q(t.user)}`,
    ...(password !== undefined ? [`password=${q(password)}`] : []),
    `dbname=${q(t.database)}`,
    t.host.startsWith("/") ? "sslmode=disable" : "sslmode=verify-full",
  ].join(" ");
}

/**
 * The `k8s4r server --database` URL of a target (never a password): `postgres://user@host:port/db`,
 * or `postgres://user@/db?host=/dir&port=N` for a socket directory.
 */
export function describeTarget(t: PgTarget): string {
  const user = encodeURIComponent(t.user);
  const db = encodeURIComponent(t.database);
  if (t.host.startsWith("/")) {
    return `postgres://${user}@/${db}?host=${
      encodeURIComponent(t.host).replaceAll("%2F", "/")
    }&port=${t.port}`;
  }
  return `postgres://${user}@${t.host}:${t.port}/${db}`;
}

/** Writes a 0600 file (temp + rename, so it is never readable by others, even briefly). */
export function writeSecretFile(path: string, text: string): Promise<void> {
  return writeFileAtomic(path, text, 0o600);
}

/** Reads a password file (first line, trimmed); the error names the file, never the value. */
export async function readPasswordFile(path: string): Promise<string> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    throw new CliError(`${path}: cannot read the password file (${(err as Error).message})`);
  }
  const pw = text.split("\n")[0].trim();
  if (!pw) throw new CliError(`${path}:1: expected a password, got an empty line`);
  return pw;
}

/** True when `dataDir` holds an initialised cluster. */
export function clusterExists(dataDir: string): boolean {
  try {
    return Deno.statSync(join(dataDir, "PG_VERSION")).isFile;
  } catch {
    return false;
  }
}

/**
 * `initdb` of a new cluster in `dataDir` (its parent must exist, 0700): superuser `superuser`
 * whose password initdb reads from `passwordFile`, scram-sha-256 for local and host
 * connections. initdb's own files are not fsync'd (`--no-sync`); the server keeps fsync on.
 */
export async function initCluster(
  runner: ProcessRunner,
  bins: PgBinaries,
  o: { dataDir: string; superuser: string; passwordFile: string },
): Promise<void> {
  const [cmd, args] = pgCommand(bins.initdb, [
    "-D",
    o.dataDir,
    "-U",
    o.superuser,
    `--pwfile=${o.passwordFile}`,
    "--auth-local=scram-sha-256",
    "--auth-host=scram-sha-256",
    "-E",
    "UTF8",
    "--locale=C.UTF-8",
    "--no-sync",
  ]);
  await runner.output(cmd, args, { timeoutMs: 120_000 });
}

/**
 * The daemon's argv: a unix socket in `socketDir` (named by `port`), no TCP at all, logs to
 * stderr. `socketDir` must be a directory only its user can enter.
 */
export function postgresArgv(
  bins: PgBinaries,
  o: { dataDir: string; socketDir: string; port: number; settings?: Record<string, string> },
  uid = Deno.uid(),
): [string, string[]] {
  const settings: Record<string, string> = {
    listen_addresses: "",
    unix_socket_directories: o.socketDir,
    unix_socket_permissions: "0700",
    shared_buffers: "32MB",
    max_connections: "100",
    ...o.settings,
  };
  return pgCommand(bins.postgres, [
    "-D",
    o.dataDir,
    "-p",
    String(o.port),
    ...Object.entries(settings).flatMap(([k, v]) => ["-c", `${k}=${v}`]),
  ], uid);
}

/**
 * What `postmaster.pid` says: the server's pid and its status line (`ready`, `starting`,
 * `stopping`, `standby`), or undefined when there is no such file (not running).
 */
export function postmasterStatus(dataDir: string): { pid: number; status: string } | undefined {
  try {
    const lines = Deno.readTextFileSync(join(dataDir, "postmaster.pid")).split("\n");
    const pid = Number(lines[0]);
    if (!Number.isInteger(pid) || pid <= 0) return undefined;
    return { pid, status: (lines[7] ?? "").trim() };
  } catch {
    return undefined;
  }
}

/** The environment that makes libpq tools read their password from `pgpassFile`. */
export function pgEnv(pgpassFile: string): Record<string, string> {
  return { PGPASSFILE: pgpassFile, PGCONNECT_TIMEOUT: "5", PGAPPNAME: "k8s4r" };
}

/** Runs SQL (stdin, never argv) through psql; returns its unaligned, tuples-only output. */
export async function psql(
  runner: ProcessRunner,
  bins: PgBinaries,
  t: PgTarget,
  pgpassFile: string,
  sql: string,
  timeoutMs = 30_000,
): Promise<string> {
  const r = await runner.output(bins.psql, [
    "-X",
    "-q",
    "-A",
    "-t",
    "-v",
    "ON_ERROR_STOP=1",
    "-h",
    t.host,
    "-p",
    String(t.port),
    "-U",
    t.user,
    "-d",
    t.database,
    "-f",
    "-",
  ], { stdin: sql, env: pgEnv(pgpassFile), timeoutMs });
  return r.stdout;
}

/** `%I` of PostgreSQL's format(): a quoted identifier. */
export function quoteIdent(s: string): string {
  return `"${s.replaceAll('"', '""')}"`;
}

/** `%L`: a quoted literal. */
export function quoteLiteral(s: string): string {
  return `'${s.replaceAll("'", "''")}'`;
}

/**
 * SQL that makes role `role` (LOGIN, the password given as its SCRAM verifier) own database
 * `database`, whether or not either exists yet. Run it as the superuser.
 */
export function ensureRoleAndDatabaseSql(role: string, password: string, database: string): string {
  const verifier = quoteLiteral(scramVerifier(password));
  return [
    `SELECT format('CREATE ROLE %I LOGIN', ${quoteLiteral(role)})`,
    `  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = ${quoteLiteral(role)})\\gexec`,
    `ALTER ROLE ${quoteIdent(role)} LOGIN PASSWORD ${verifier};`,
    `SELECT format('CREATE DATABASE %I OWNER %I', ${quoteLiteral(database)}, ${
      quoteLiteral(role)
    })`,
    `  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = ${quoteLiteral(database)})\\gexec`,
    "",
  ].join("\n");
}
