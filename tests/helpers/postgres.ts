/**
 * A REAL PostgreSQL for tests (src/postgres/cluster.ts): initdb + pg_ctl in a temp dir, a unix
 * socket in that dir and a free loopback port, SCRAM-SHA-256 for both, TLS on the port (a
 * certificate for `localhost` from a throwaway CA, for sslmode=verify-full). The application role
 * `k8s4r` (no superuser) owns the databases tests create; its password is in a 0600 file, as
 * `k8s4r server --database-password-file` wants it.
 *
 * If PostgreSQL cannot be started the call throws and says why: a test that needs it fails,
 * it is never skipped. `destroy()` stops the server (`pg_ctl stop -m fast`, pid checked) and
 * deletes the dir; clusters left by a test runner that was killed are reaped by the next start.
 */
import { join } from "node:path";
// @ts-types="@types/pg"
import pg from "pg";
import { freePort } from "./ports.ts";
import { realRunner } from "../../src/process/mod.ts";
import { findPostgresBinaries, PostgresCluster, reapOrphans } from "../../src/postgres/cluster.ts";
import {
  describePostgres,
  openPostgresRegistry,
  type PostgresConfig,
} from "../../src/server/registry_postgres.ts";
import type { RegistryFixture } from "../../src/server/testing/registry_contract.ts";
import { TestCa } from "../../src/spiffe/testing/test_ca.ts";

const PREFIX = "k8s4r-pg-";
export const APP_USER = "k8s4r";
const ADMIN = "k8s4r_admin";

export interface TestPostgres {
  dir: string;
  socketDir: string;
  port: number;
  version: string;
  user: string;
  password: string;
  /** The app role's password, mode 0600. */
  passwordFile: string;
  cluster: PostgresCluster;
  /** The CA (PEM file) of the server's TLS certificate, issued for `localhost`. */
  tlsCaFile: string;
  /**
   * How the server connects: unix socket (default), TCP on 127.0.0.1, or TLS on TCP to
   * `localhost` (sslmode=verify-full against `tlsCaFile`); with the password.
   */
  config(database: string, via?: Via): PostgresConfig;
  /** The same, as the `--database` URL (never with a password). */
  url(database: string, via?: Via): string;
  /** A new empty database owned by the app role. */
  createDatabase(prefix?: string): Promise<string>;
  dropDatabase(name: string): Promise<void>;
  /** A statement as the superuser. */
  admin(sql: string, params?: unknown[], database?: string): Promise<Record<string, unknown>[]>;
  /** A session of its own as the superuser (to hold a transaction open); end() it. */
  adminSession(database: string): Promise<pg.Client>;
  logTail(n?: number): Promise<string>;
  /**
   * SIGSTOP to the server and every process it forked (backends, checkpointer...): a frozen
   * PostgreSQL, whose sockets the kernel still accepts and acknowledges. Returns the pids.
   */
  freeze(): number[];
  /** SIGCONT to what `freeze` stopped. */
  thaw(): void;
  destroy(): Promise<void>;
}

export type Via = "socket" | "tcp" | "tls";

function secret(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(18)))
    .map((b) => b.toString(16).padStart(2, "0")).join("");
}

export async function startTestPostgres(): Promise<TestPostgres> {
  const tmp = Deno.env.get("TMPDIR") || "/tmp";
  let binaries;
  try {
    binaries = await findPostgresBinaries(realRunner);
  } catch (err) {
    throw new Error(`cannot start a test PostgreSQL: ${(err as Error).message}`);
  }
  await reapOrphans(realRunner, binaries, tmp, PREFIX);
  const dir = await Deno.makeTempDir({ prefix: PREFIX, dir: tmp });
  const adminPassword = secret();
  const password = secret();
  const port = freePort();
  // TLS on TCP, for sslmode=verify-full: a throwaway CA and a certificate for localhost.
  const ca = TestCa.create({ commonName: "k8s4r test PostgreSQL CA" });
  const serverCert = ca.issue({ dnsNames: ["localhost"], ttlSeconds: 24 * 3600 });
  let cluster: PostgresCluster | undefined;
  const pools = new Map<string, pg.Pool>();
  const adminPool = (database: string) => {
    let p = pools.get(database);
    if (!p) {
      p = new pg.Pool({
        host: dir,
        port,
        user: ADMIN,
        password: adminPassword,
        database,
        max: 2,
        ssl: false,
      });
      p.on("error", () => {}); // the server stopping under an idle admin connection
      pools.set(database, p);
    }
    return p;
  };
  const closeAdmin = async () => {
    for (const p of pools.values()) await p.end().catch(() => {});
    pools.clear();
  };
  try {
    cluster = await PostgresCluster.init({
      runner: realRunner,
      binaries,
      dir,
      port,
      superuser: ADMIN,
      superuserPassword: adminPassword,
      tls: { certPem: serverCert.certPem, keyPem: serverCert.keyPem },
    });
    await cluster.start();
    // The password is a random hex string: nothing in it needs quoting.
    await adminPool("postgres").query(`CREATE ROLE ${APP_USER} LOGIN PASSWORD '${password}'`);
  } catch (err) {
    await closeAdmin();
    const log = await cluster?.logTail(5) ?? "";
    await (cluster?.destroy() ?? Deno.remove(dir, { recursive: true }).catch(() => {}));
    throw new Error(
      `cannot start a test PostgreSQL ${binaries.version} in ${dir}: ${(err as Error).message}${
        log ? `\n${log}` : ""
      }`,
    );
  }
  // The client side's file: readable by us only (the dir itself belongs to postgres).
  const passwordFile = join(dir, "k8s4r.pw");
  await Deno.writeTextFile(passwordFile, password + "\n", { mode: 0o600 });
  const tlsCaFile = join(dir, "tls-ca.pem");
  await Deno.writeTextFile(tlsCaFile, ca.rootPem);
  let n = 0;
  let frozen: number[] = [];
  const thaw = () => {
    for (const pid of frozen) {
      try {
        Deno.kill(pid, "SIGCONT");
      } catch { /* gone */ }
    }
    frozen = [];
  };
  const c = cluster;
  const config = (database: string, via: Via = "socket"): PostgresConfig => ({
    host: via === "socket" ? dir : via === "tls" ? "localhost" : "127.0.0.1",
    port,
    user: APP_USER,
    database,
    password,
    ...(via === "tls" ? { sslmode: "verify-full" as const, sslrootcert: tlsCaFile } : {}),
  });
  return {
    dir,
    socketDir: dir,
    port,
    version: binaries.version,
    user: APP_USER,
    password,
    passwordFile,
    tlsCaFile,
    cluster: c,
    config,
    url: (database, via) => describePostgres(config(database, via)),
    async createDatabase(prefix = "t") {
      const name = `${prefix}_${Deno.pid}_${++n}`;
      await adminPool("postgres").query(`CREATE DATABASE ${name} OWNER ${APP_USER}`);
      return name;
    },
    async dropDatabase(name) {
      const p = pools.get(name);
      if (p) {
        pools.delete(name);
        await p.end().catch(() => {});
      }
      await adminPool("postgres").query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
    },
    async admin(sql, params = [], database = "postgres") {
      return (await adminPool(database).query(sql, params)).rows;
    },
    async adminSession(database) {
      const client = new pg.Client({
        host: dir,
        port,
        user: ADMIN,
        password: adminPassword,
        database,
        ssl: false,
      });
      client.on("error", () => {}); // the server stopping under it
      await client.connect();
      return client;
    },
    logTail: (lines) => c.logTail(lines),
    freeze() {
      const root = c.pid;
      if (root === undefined) throw new Error("freeze: the test PostgreSQL is not running");
      frozen = [root, ...childrenOf(root)];
      for (const pid of frozen) Deno.kill(pid, "SIGSTOP");
      return frozen;
    },
    thaw,
    async destroy() {
      thaw();
      await closeAdmin();
      await c.destroy();
    },
  };
}

/** The processes whose parent is `pid` (from /proc; PostgreSQL's backends and workers). */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${e.name}/stat`);
      // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === pid) out.push(Number(e.name));
    } catch { /* gone */ }
  }
  return out;
}

/** The registry contract's PostgreSQL store: a new database per case. */
export function postgresFixture(pgs: TestPostgres): RegistryFixture {
  return {
    name: "postgres",
    async create() {
      const db = await pgs.createDatabase("contract");
      return {
        open: () => openPostgresRegistry(pgs.config(db)),
        async forgeSchemaVersion(v) {
          await pgs.admin(
            "INSERT INTO k8s4r_schema_migrations (version, k8s4r_version) VALUES ($1, 'forged')",
            [v],
            db,
          );
        },
        async exec(sql) {
          await pgs.admin(sql, [], db);
        },
        dispose: () => pgs.dropDatabase(db),
      };
    },
  };
}
