/**
 * How the fleet server's `pg` clients connect to PostgreSQL, in one place (the registry's pools,
 * and any other client of the registry's database): where, as whom, over what, and which
 * authentication requests they answer.
 *
 * - A password never goes out in a form that whoever answers at the address could use: a
 *   request for the password in cleartext (`password` in pg_hba.conf) or as an MD5 hash (`md5`
 *   with an MD5-stored password) is refused unless the connection is TLS with a verified server
 *   certificate (`sslmode=verify-full`). SCRAM-SHA-256 proves the password without revealing it
 *   (and checks that the server knows it too), so it is answered on any connection. Why this
 *   matters: a local user who takes the port while PostgreSQL is down (clients retry every
 *   second) would otherwise receive the password in the first second, just by asking for it in
 *   cleartext.
 * - `sslmode=verify-full`: TLS, the server certificate verified against `sslrootcert` (or the
 *   runtime's CA store) and the host name (or IP address) checked against it, like libpq's
 *   mode of that name. Without it (`disable`, the default) the connection is plain: on a unix
 *   socket (in a directory only the server's user can write) or on loopback.
 *
 * `pg` (8.23.1, pinned) has no option to refuse an authentication method (libpq 16 has
 * `require_auth`): `StrictAuthClient` overrides the two handlers pg binds to the server's
 * `AuthenticationCleartextPassword` and `AuthenticationMD5Password` messages
 * (`_handleAuthCleartextPassword`, `_handleAuthMD5Password` in pg/lib/client.js). A pg upgrade
 * that renamed them would be caught by src/server/postgres_connect_test.ts, which asks for the
 * password in cleartext through a fake server and checks that it never arrives.
 */
import { checkServerIdentity, type PeerCertificate } from "node:tls";
// @ts-types="@types/pg"
import pg from "pg";

/** libpq's `sslmode`, the two values k8s4r takes: plain, or TLS with full verification. */
export type SslMode = "disable" | "verify-full";

export const SSL_MODES: readonly SslMode[] = ["disable", "verify-full"];

/** Where and how to reach PostgreSQL (registry_postgres.ts `PostgresConfig` is one). */
export interface PgEndpoint {
  /** A host name or address, or the directory of the server's unix socket (absolute path). */
  host: string;
  port: number;
  user: string;
  database: string;
  password?: string;
  /** Default `disable`. */
  sslmode?: SslMode;
  /** PEM file of the CAs that may sign the server's certificate (`verify-full`). */
  sslrootcert?: string;
}

/** The server asked for a password in a form that would reveal it to a stranger. */
export class InsecureAuthError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "InsecureAuthError";
  }
}

/** What refusing says: which request, and what to do instead. */
export function insecureAuthMessage(method: "cleartext" | "MD5"): string {
  return `the server asked for the password ${
    method === "cleartext" ? "in cleartext" : "as an MD5 hash"
  } on a connection without verified TLS: refused, whoever answers at this address would learn ${
    method === "cleartext" ? "it" : "a hash that can be cracked or replayed"
  } (use scram-sha-256 authentication: password_encryption = 'scram-sha-256', then set the password again; or TLS: ?sslmode=verify-full)`;
}

interface PgConnection {
  emit(event: string, err: Error): void;
  stream?: { destroy(): void };
}

type AuthRefusal = (method: "cleartext" | "MD5") => void;

/**
 * `pg.Client` that answers a cleartext or MD5 password request only over verified TLS (this
 * module's doc). Everything else is pg's.
 */
export class StrictAuthClient extends pg.Client {
  /** pg's connection to the server (not in @types/pg). */
  private get conn(): PgConnection {
    return (this as unknown as { connection: PgConnection }).connection;
  }

  private get verifiedTls(): boolean {
    const ssl = (this as unknown as { ssl?: unknown }).ssl;
    return typeof ssl === "object" && ssl !== null &&
      (ssl as { rejectUnauthorized?: boolean }).rejectUnauthorized === true;
  }

  private refuse: AuthRefusal = (method) => {
    // pg's error path while connecting: connect() rejects with this error; the socket is
    // closed so that nothing more is said to that server.
    this.conn.emit("error", new InsecureAuthError(insecureAuthMessage(method)));
    this.conn.stream?.destroy();
  };

  // Overrides pg/lib/client.js (bound in `_attachListeners`, at connect time).
  _handleAuthCleartextPassword(msg: unknown): void {
    if (!this.verifiedTls) return this.refuse("cleartext");
    (pg.Client.prototype as unknown as Record<string, (m: unknown) => void>)
      ._handleAuthCleartextPassword.call(this, msg);
  }

  _handleAuthMD5Password(msg: unknown): void {
    if (!this.verifiedTls) return this.refuse("MD5");
    (pg.Client.prototype as unknown as Record<string, (m: unknown) => void>)
      ._handleAuthMD5Password.call(this, msg);
  }
}

/** pg's `ssl` option for an endpoint: false, or TLS verified like libpq's verify-full. */
export function sslOptions(e: PgEndpoint): false | Record<string, unknown> {
  if ((e.sslmode ?? "disable") === "disable") return false;
  let ca: string | undefined;
  if (e.sslrootcert !== undefined) {
    try {
      ca = Deno.readTextFileSync(e.sslrootcert);
    } catch (err) {
      throw new Error(`${e.sslrootcert}: cannot read sslrootcert: ${(err as Error).message}`);
    }
  }
  return {
    rejectUnauthorized: true,
    ...(ca !== undefined ? { ca } : {}),
    // The name checked is the configured host, name or IP address, never a default.
    checkServerIdentity: (_name: string, cert: PeerCertificate) =>
      checkServerIdentity(e.host, cert),
  };
}

/**
 * The pg options every client of an endpoint uses (pool or single client). `ssl` is explicit:
 * pg would otherwise read PGSSLMODE from the environment.
 */
export function clientConfig(e: PgEndpoint): pg.ClientConfig {
  return {
    host: e.host,
    port: e.port,
    user: e.user,
    database: e.database,
    password: e.password,
    ssl: sslOptions(e) as pg.ClientConfig["ssl"],
  };
}

/** A single client (outside a pool) with the same rules. */
export function newClient(e: PgEndpoint, extra: pg.ClientConfig = {}): pg.Client {
  return new StrictAuthClient({ ...clientConfig(e), ...extra });
}

/** Pool options: `clientConfig` and the strict client. */
export function poolConfig(e: PgEndpoint, extra: pg.PoolConfig = {}): pg.PoolConfig {
  return { ...clientConfig(e), ...extra, Client: StrictAuthClient };
}
