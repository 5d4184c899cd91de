/**
 * A REAL PostgreSQL 15 for SPIRE's tests, started by the test itself (src/postgres/
 * local_cluster.ts: initdb in a temp dir, the daemon on a free loopback port, scram-sha-256,
 * passwords only in 0600 files). If it cannot be started the test FAILS and says why.
 *
 * (Branch i13-storage has its own harness, tests/helpers/postgres.ts, for the fleet server's
 * registry; both start the same kind of cluster and are meant to be unified once both landed.)
 */
import { join } from "node:path";
import {
  clusterExists,
  ensureRoleAndDatabaseSql,
  findPgBinaries,
  initCluster,
  type PgBinaries,
  pgpassLine,
  type PgTarget,
  postgresArgv,
  postmasterStatus,
  psql,
  randomPassword,
  writeSecretFile,
} from "../../src/postgres/local_cluster.ts";
import { type Daemon, realRunner, tailFile, waitFor } from "../../src/process/mod.ts";
import { freePort } from "./ports.ts";

export const PG_ADMIN = "k8s4r_admin";

export interface TestPg {
  dir: string;
  dataDir: string;
  port: number;
  bins: PgBinaries;
  logFile: string;
  /** pgpass for every role this cluster knows (0600). */
  pgpassFile: string;
  admin: PgTarget;
  /** The postmaster's pid while it runs. */
  pid(): number | undefined;
  /** SQL as the superuser. */
  sql(text: string, database?: string): Promise<string>;
  /** A LOGIN role owning a new database; its password is returned and added to pgpass. */
  roleWithDatabase(role: string, database: string): Promise<{ target: PgTarget; password: string }>;
  /** Stops the server (SIGINT: fast shutdown) and waits until it is gone. */
  stop(): Promise<void>;
  /** Starts it again (same port and data). */
  start(): Promise<void>;
  /** Stops it and deletes the directory. */
  destroy(): Promise<void>;
}

export async function startTestPg(): Promise<TestPg> {
  const bins = await findPgBinaries(realRunner, Deno.env.toObject()).catch((err) => {
    throw new Error(`cannot start a test PostgreSQL: ${(err as Error).message}`);
  });
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-pgspire-" });
  await Deno.chmod(dir, 0o700);
  const dataDir = join(dir, "data");
  const logFile = join(dir, "postgres.log");
  const port = freePort();
  const adminPassword = randomPassword();
  const adminPwFile = join(dir, "admin.password");
  const pgpassFile = join(dir, "pgpass");
  const admin: PgTarget = { host: "127.0.0.1", port, user: PG_ADMIN, database: "postgres" };
  const pgpass = [pgpassLine(admin, adminPassword)];
  await writeSecretFile(adminPwFile, adminPassword + "\n");
  await writeSecretFile(pgpassFile, pgpass.join(""));
  let daemon: Daemon | undefined;
  const start = async () => {
    const [cmd, args] = postgresArgv(bins, { dataDir, port });
    daemon = await realRunner.spawn({
      name: "postgres",
      cmd,
      args,
      logFile,
      ready: () => Promise.resolve(postmasterStatus(dataDir)?.status === "ready"),
      readyTimeoutMs: 60_000,
      readyIntervalMs: 20,
    });
  };
  const stop = async () => {
    const d = daemon;
    daemon = undefined;
    if (!d) return;
    try {
      Deno.kill(d.pid, "SIGINT"); // fast shutdown: clients are disconnected at once
    } catch { /* gone */ }
    const gone = await Promise.race([
      d.exited.then(() => true),
      new Promise<boolean>((r) => setTimeout(() => r(false), 20_000)),
    ]);
    if (!gone) await d.stop(1000);
    await waitFor(() => postmasterStatus(dataDir) === undefined, {
      timeoutMs: 10_000,
      what: "postmaster.pid to go",
    }).catch(() => {});
  };
  try {
    if (!clusterExists(dataDir)) {
      await initCluster(realRunner, bins, {
        dataDir,
        superuser: PG_ADMIN,
        passwordFile: adminPwFile,
      });
    }
    await start();
  } catch (err) {
    const log = await tailFile(logFile, 5);
    await stop().catch(() => {});
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    throw new Error(
      `cannot start a test PostgreSQL ${bins.version}: ${(err as Error).message}${
        log ? `\n${log}` : ""
      }`,
    );
  }
  const sql = (text: string, database = "postgres") =>
    psql(realRunner, bins, { ...admin, database }, pgpassFile, text);
  return {
    dir,
    dataDir,
    port,
    bins,
    logFile,
    pgpassFile,
    admin,
    pid: () => daemon?.pid,
    sql,
    async roleWithDatabase(role, database) {
      const password = randomPassword();
      await sql(ensureRoleAndDatabaseSql(role, password, database));
      const target: PgTarget = { host: "127.0.0.1", port, user: role, database };
      pgpass.push(pgpassLine(target, password));
      await writeSecretFile(pgpassFile, pgpass.join(""));
      return { target, password };
    },
    stop,
    start,
    async destroy() {
      await stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}
