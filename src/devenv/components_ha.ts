/**
 * The rows `devenv start --ha` and `--root-ca` add to the component table (components.ts):
 *
 * - `postgres`: a private PostgreSQL 15 cluster under `.dev-env/postgres` (loopback TCP only,
 *   scram-sha-256, a generated superuser password in a 0600 file), SPIRE's shared datastore;
 * - `spire-database`: the `spire` role (its own generated password, 0600) owning database
 *   `spire`;
 * - `root-ca`: the root CA and SPIRE's upstream CA in `.spire-data/ca` (`k8s4r ca init`
 *   creates it when there is none), so SPIRE's CA rotations keep the trust bundle;
 * - `haproxy`: the one SPIRE address agents dial, in front of `spire-server` and
 *   `spire-server-2` (the second server is `spireServerComponent(view, 2)` of components.ts).
 */
import { join } from "node:path";
import { CliError } from "../cli/errors.ts";
import { caFiles, initCa, readCa } from "../ca/mod.ts";
import { fileMode, writeFileAtomic } from "../fs/atomic.ts";
import {
  clusterExists,
  describeTarget,
  ensureRoleAndDatabaseSql,
  findPgBinaries,
  initCluster,
  pgEnv,
  pgpassLine,
  type PgTarget,
  postgresArgv,
  postmasterStatus,
  psql,
  randomPassword,
  readPasswordFile,
  writeSecretFile,
} from "../postgres/local_cluster.ts";
import { isRecordAlive, readPidFile } from "../process/mod.ts";
import type { Component, StackView, StartRun } from "./components.ts";
import { PROBE_INTERVAL_MS } from "./context.ts";
import { findHaproxy, haproxyBackends, renderHaproxyConfig } from "./haproxy.ts";
import { FLEET_DB, type Layout, PG_SUPERUSER, SPIRE_DB, spireServerHost } from "./layout.ts";
import { type ProbeResult, tcpOpen } from "./probes.ts";
import type { ComponentStatus } from "./render.ts";

function pidInfo(file: string): { running: boolean; pid: number | null } {
  const rec = readPidFile(file);
  const running = isRecordAlive(rec);
  return { running, pid: running ? rec!.pid : null };
}

export function adminTarget(layout: Layout): PgTarget {
  return {
    host: "127.0.0.1",
    port: layout.ha.postgresPort,
    user: PG_SUPERUSER,
    database: "postgres",
  };
}

export function spireTarget(layout: Layout): PgTarget {
  return {
    host: "127.0.0.1",
    port: layout.ha.postgresPort,
    user: SPIRE_DB.role,
    database: SPIRE_DB.database,
  };
}

export function fleetTarget(layout: Layout): PgTarget {
  return {
    host: "127.0.0.1",
    port: layout.ha.postgresPort,
    user: FLEET_DB.role,
    database: FLEET_DB.database,
  };
}

let pgpassChain: Promise<unknown> = Promise.resolve();

/**
 * The pgpass file (0600) from the password files that exist: admin, spire, k8s4r. The database
 * steps run at once and each writes it after creating its password file: the writes take turns,
 * each reading the files when its turn comes, so the last one holds every password (two writes
 * interleaved could leave out the other step's line, and its psql found no password).
 */
export function writePgpass(layout: Layout): Promise<void> {
  const p = pgpassChain.then(() => writePgpassNow(layout));
  pgpassChain = p.catch(() => {});
  return p;
}

async function writePgpassNow(layout: Layout): Promise<void> {
  const lines: string[] = [];
  for (
    const [file, target] of [
      [layout.ha.postgresAdminPasswordFile, adminTarget(layout)],
      [layout.ha.spirePasswordFile, spireTarget(layout)],
      [layout.ha.fleetPasswordFile, fleetTarget(layout)],
    ] as const
  ) {
    if (fileMode(file) === undefined) continue;
    lines.push(pgpassLine(target, await readPasswordFile(file)));
  }
  await writeSecretFile(layout.ha.pgpassFile, lines.join(""));
}

/** Our PostgreSQL runs (pid file) and says `ready` in postmaster.pid. */
export function probePostgres(view: StackView): ProbeResult {
  const { layout, files } = view.ctx;
  const rec = readPidFile(files.postgresPid);
  if (!rec || !isRecordAlive(rec)) return { ok: false, detail: "not running" };
  const st = postmasterStatus(layout.ha.postgresDataDir);
  if (!st) return { ok: false, detail: "no postmaster.pid" };
  if (st.pid !== rec.pid) {
    return { ok: false, detail: `postmaster.pid names pid ${st.pid}, ours is ${rec.pid}` };
  }
  return st.status === "ready"
    ? { ok: true, detail: "accepting connections" }
    : { ok: false, detail: `postmaster status '${st.status}'` };
}

export function postgresComponent(view: StackView): Component {
  const { layout, files } = view.ctx;
  const ha = layout.ha;
  const endpoint = `127.0.0.1:${ha.postgresPort}`;
  return {
    name: "postgres",
    kind: "daemon",
    needs: [],
    // Last: every SPIRE (and fleet) server that uses it stops first.
    stopRank: 95,
    // Fast shutdown: SPIRE's pooled connections would hold a smart shutdown (SIGTERM) forever.
    stopSignal: "SIGINT",
    pidFile: files.postgresPid,
    logs: [{ name: "postgres", file: files.postgresLog }],
    probe: (v) => Promise.resolve(probePostgres(v)),
    hint: () =>
      "PostgreSQL is down: the SPIRE servers can neither read nor write their datastore " +
      "(robots keep their current SVIDs, new attestations and entries fail). Start it: " +
      "`k8s4r devenv start`; its log: `k8s4r devenv logs postgres`",
    async spawn(run) {
      const { io } = run.ctx;
      const bins = await run.once("pg binaries", () => findPgBinaries(io.runner, io.env));
      await Deno.mkdir(ha.postgresDir, { recursive: true, mode: 0o700 });
      await Deno.chmod(ha.postgresDir, 0o700);
      if (!clusterExists(ha.postgresDataDir)) {
        // A data dir that initdb left half-made is not a cluster: start over.
        await Deno.remove(ha.postgresDataDir, { recursive: true }).catch(() => {});
        await writeSecretFile(ha.postgresAdminPasswordFile, randomPassword() + "\n");
        await initCluster(io.runner, bins, {
          dataDir: ha.postgresDataDir,
          superuser: PG_SUPERUSER,
          passwordFile: ha.postgresAdminPasswordFile,
        });
      }
      await writePgpass(layout);
      const [cmd, args] = postgresArgv(bins, {
        dataDir: ha.postgresDataDir,
        port: ha.postgresPort,
      });
      return await io.runner.spawn({
        name: "postgres",
        cmd,
        args,
        cwd: layout.root,
        env: run.childEnv,
        logFile: files.postgresLog,
        pidFile: files.postgresPid,
        detached: true,
        ready: () => Promise.resolve(probePostgres(run).ok),
        readyTimeoutMs: 60_000,
        readyIntervalMs: PROBE_INTERVAL_MS,
      });
    },
    summary: () => endpoint,
    status(v) {
      const p = pidInfo(files.postgresPid);
      const probe = p.running ? probePostgres(v) : { ok: false, detail: "" };
      return Promise.resolve({
        name: "postgres",
        ...p,
        healthy: p.running && probe.ok,
        endpoint,
        detail: p.running ? probe.detail : "",
      });
    },
  };
}

/** Where `k8s4r backup restore` leaves a database's dump for the next start. */
export function pendingRestore(layout: Layout, database: string): string {
  return join(layout.ha.postgresDir, "restore", `${database}.dump`);
}

/** A role owning its database; the role's password is generated once (0600). */
function databaseStep(
  view: StackView,
  name: string,
  target: PgTarget,
  passwordFile: string,
): Component {
  const { layout } = view.ctx;
  return {
    name,
    kind: "step",
    needs: ["postgres"],
    async run(run: StartRun) {
      const { io } = run.ctx;
      if (fileMode(passwordFile) === undefined) {
        await writeSecretFile(passwordFile, randomPassword() + "\n");
      }
      await writePgpass(layout);
      const password = await readPasswordFile(passwordFile);
      const bins = await run.once("pg binaries", () => findPgBinaries(io.runner, io.env));
      // One role at a time: CREATE ROLE/DATABASE of two steps at once could race.
      await run.once(`db ${target.database}`, () =>
        withPgAdminLock(() =>
          psql(
            io.runner,
            bins,
            adminTarget(layout),
            layout.ha.pgpassFile,
            ensureRoleAndDatabaseSql(target.user, password, target.database),
          )
        ));
      // A restored backup (`k8s4r backup restore`) left a dump for this database: load it
      // into the new, empty database before anything uses it, then drop the file.
      const pending = pendingRestore(layout, target.database);
      if (fileMode(pending) !== undefined) {
        const tables = await psql(
          io.runner,
          bins,
          target,
          layout.ha.pgpassFile,
          "SELECT count(*) FROM pg_tables WHERE schemaname = 'public';",
        );
        if (Number(tables.trim()) > 0) {
          throw new CliError(
            `${pending}: a backup to restore, but database ${target.database} has tables`,
            1,
            "restore onto a clean control host (k8s4r devenv clean first), or remove the file",
          );
        }
        await io.runner.output(bins.pgRestore, [
          "--no-owner",
          "--no-privileges",
          "--exit-on-error",
          "-h",
          target.host,
          "-p",
          String(target.port),
          "-U",
          target.user,
          "-d",
          target.database,
          pending,
        ], { env: pgEnv(layout.ha.pgpassFile), timeoutMs: 300_000 });
        await Deno.remove(pending);
        return `${describeTarget(target)}, restored from the backup`;
      }
      return `${describeTarget(target)} (password in ${passwordFile})`;
    },
  };
}

let adminChain: Promise<unknown> = Promise.resolve();
/** Serialises the admin statements of one start. */
function withPgAdminLock<T>(fn: () => Promise<T>): Promise<T> {
  const p = adminChain.then(fn, fn);
  adminChain = p.catch(() => {});
  return p;
}

/** SPIRE's datastore: the `spire` role and database. */
export function spireDatabaseStep(view: StackView): Component {
  const { layout } = view.ctx;
  return databaseStep(view, "spire-database", spireTarget(layout), layout.ha.spirePasswordFile);
}

/** The fleet servers' registry: the `k8s4r` role and database. */
export function fleetDatabaseStep(view: StackView): Component {
  const { layout } = view.ctx;
  return databaseStep(view, "fleet-database", fleetTarget(layout), layout.ha.fleetPasswordFile);
}

/** The root CA SPIRE's upstream authority uses; created on first use. */
export function rootCaStep(view: StackView): Component {
  const { layout } = view.ctx;
  const f = caFiles(layout.caDir);
  return {
    name: "root-ca",
    kind: "step",
    needs: [],
    async run() {
      if (fileMode(f.rootCert) === undefined) {
        const { root, upstream } = await initCa(layout.caDir, { trustDomain: layout.trustDomain });
        return `created in ${layout.caDir}: root SHA-256 ${
          root.fingerprint256.slice(0, 23)
        }..., upstream until ${upstream.validTo} (production: \`k8s4r ca init\`, root key offline)`;
      }
      const st = await readCa(layout.caDir);
      if (st.problems.length) {
        throw new CliError(
          `root CA in ${layout.caDir}: ${st.problems.join("; ")}`,
          1,
          "see `k8s4r ca show --dir " + layout.caDir + "`; renew with `k8s4r ca issue`",
        );
      }
      return `root SHA-256 ${st.root!.fingerprint256.slice(0, 23)}..., upstream until ${
        st.upstream!.validTo
      }${st.rootKeyOnline ? "" : " (root key offline)"}`;
    },
    async status(): Promise<ComponentStatus> {
      const st = await readCa(layout.caDir).catch((err) => ({
        root: undefined,
        upstream: undefined,
        rootKeyOnline: false,
        problems: [(err as Error).message],
      }));
      return {
        name: "root-ca",
        running: st.root !== undefined,
        pid: null,
        healthy: st.problems.length === 0,
        endpoint: f.rootCert,
        detail: st.problems.length
          ? st.problems.join("; ")
          : `root until ${st.root!.validTo}, upstream until ${st.upstream!.validTo}${
            st.rootKeyOnline ? "; root key on this host" : "; root key offline"
          }`,
      };
    },
  };
}

/** haproxy answers on its admin socket and accepts connections on the SPIRE port. */
async function probeHaproxy(view: StackView): Promise<ProbeResult> {
  const { layout, files } = view.ctx;
  const backends = await haproxyBackends(files.haproxyStatsSocket);
  if (!backends) return { ok: false, detail: "its stats socket does not answer" };
  const host = spireServerHost(layout);
  if (!(await tcpOpen(layout.ports.spireServer, 1000, host))) {
    return { ok: false, detail: `nothing accepts on ${host}:${layout.ports.spireServer}` };
  }
  return { ok: true, detail: [...backends].map(([n, s]) => `${n} ${s}`).join(", ") };
}

/**
 * haproxy on the SPIRE port everyone dials: on loopback, or on the `--advertise` address (where
 * robots on other hosts and this host's agents reach SPIRE; the servers behind it stay on
 * loopback, each on its own port).
 */
export function haproxyComponent(view: StackView): Component {
  const { layout, files } = view.ctx;
  const endpoint = `${spireServerHost(layout)}:${layout.ports.spireServer}`;
  const backends = () => [
    { name: "spire-server", address: "127.0.0.1", port: layout.ha.spireServerPorts[0] },
    { name: "spire-server-2", address: "127.0.0.1", port: layout.ha.spireServerPorts[1] },
  ];
  return {
    name: "haproxy",
    kind: "daemon",
    needs: [],
    // After the agents (10), the server and the broker, before the SPIRE servers (90).
    stopRank: 80,
    pidFile: files.haproxyPid,
    logs: [{ name: "haproxy", file: files.haproxyLog }],
    probe: probeHaproxy,
    hint: () =>
      "no SPIRE server is reachable through haproxy: `k8s4r devenv status` shows which one is " +
      "down; `k8s4r devenv start` restarts it",
    async spawn(run) {
      const bin = findHaproxy(run.ctx.io.env);
      if (!bin) {
        throw new CliError(
          "haproxy not found (on PATH, /usr/sbin)",
          1,
          "install it: apt-get install -y haproxy",
        );
      }
      await writeFileAtomic(
        files.haproxyConfig,
        renderHaproxyConfig({
          frontend: { address: spireServerHost(layout), port: layout.ports.spireServer },
          backends: backends(),
          statsSocket: files.haproxyStatsSocket,
        }),
        0o600,
      );
      await Deno.remove(files.haproxyStatsSocket).catch(() => {});
      return await run.ctx.io.runner.spawn({
        name: "haproxy",
        cmd: bin,
        args: ["-f", files.haproxyConfig, "-db"],
        cwd: layout.root,
        env: run.childEnv,
        logFile: files.haproxyLog,
        pidFile: files.haproxyPid,
        detached: true,
        ready: async () => (await probeHaproxy(run)).ok,
        readyTimeoutMs: 30_000,
        readyIntervalMs: PROBE_INTERVAL_MS,
      });
    },
    summary: () => `${endpoint} -> ${backends().map((b) => b.port).join(", ")}`,
    async status(v) {
      const p = pidInfo(files.haproxyPid);
      const probe = p.running ? await probeHaproxy(v) : { ok: false, detail: "" };
      // Healthy while at least one SPIRE server is up behind it.
      const up = probe.ok && /\bUP\b/.test(probe.detail);
      return {
        name: "haproxy",
        ...p,
        healthy: p.running && up,
        endpoint,
        detail: p.running
          ? (probe.ok && !up ? `no SPIRE server up: ${probe.detail}` : probe.detail)
          : "",
      };
    },
  };
}
