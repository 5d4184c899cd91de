/**
 * The process behind `k8s4r devenv spire-server` (hidden; `devenv start` runs it detached).
 *
 * spire-server prints every join-token agent's SPIFFE ID, and that ID embeds the token. Its
 * output can only be redacted while it flows through a process of ours, so devenv does not
 * detach spire-server itself: it detaches this small supervisor, which runs spire-server as a
 * child (dying with it, even on kill -9) and writes the redacted log. Stopping this process
 * stops the server.
 *
 * On the HA stack (`--ha`) it is one of two servers (`--server 1|2`) on their own ports,
 * sharing the PostgreSQL datastore: this process reads the datastore password from its 0600
 * file and hands it to SPIRE only through the 0600 rendered config (never argv or env), and
 * redacts it from SPIRE's output too. With `--root-ca`, SPIRE's CA is signed by the upstream
 * CA of the root CA in `.spire-data/ca` (`UpstreamAuthority "disk"`).
 */
import { CliError } from "../cli/errors.ts";
import { caFiles, upstreamAuthorityOf } from "../ca/mod.ts";
import { keywordValue, readPasswordFile } from "../postgres/local_cluster.ts";
import { ensureSpireBinaries } from "../spire/binaries.ts";
import { type StartServerOptions, startSpireServer } from "../spire/server.ts";
import type { DevenvContext } from "./context.ts";
import { SPIRE_DB, spireServerHost } from "./layout.ts";

export interface SpireServerRunOptions {
  /** ca_ttl in seconds; undefined = the config file's value. */
  caTtl?: number;
  /** spire-server, as `start` found and checked it; undefined = look it up. */
  bin?: string;
  /** `experimental.cache_reload_interval`; undefined = the config file's, else SPIRE's. */
  cacheReloadInterval?: string;
  /** `ratelimit.attestation`; undefined = the config file's, else SPIRE's (on). */
  attestationRateLimit?: boolean;
  /** `experimental.events_based_cache`; undefined = the config file's, else SPIRE's (off). */
  eventsBasedCache?: boolean;
  /** Which server of the HA stack (1 or 2); 1 without --ha. */
  server?: 1 | 2;
  /** The HA stack: PostgreSQL datastore, the server's own port. */
  ha?: boolean;
  /** SPIRE's CA under the root CA (`UpstreamAuthority "disk"`). */
  rootCa?: boolean;
  /** `agent_ttl` (Go duration); undefined = SPIRE's. */
  agentTtl?: string;
  /** The x509pop NodeAttestor's factory CA bundle (`start --attestation x509pop`). */
  x509popCaBundle?: string;
}

/**
 * Where server `n` of this stack keeps its socket, data and log, on which port it serves, and
 * where its telemetry is (on loopback, scraped by `devenv start --monitoring`).
 */
export function spireServerPlace(ctx: DevenvContext, n: 1 | 2, ha: boolean) {
  const { layout, files } = ctx;
  return n === 1
    ? {
      port: ha ? layout.ha.spireServerPorts[0] : layout.ports.spireServer,
      dataDir: layout.spireServerDataDir,
      socket: layout.spireServerSocket,
      log: files.spireServerLog,
      pid: files.spireServerPid,
      telemetryPort: files.spireServerTelemetryPort,
    }
    : {
      port: layout.ha.spireServerPorts[1],
      dataDir: layout.ha.spireServer2DataDir,
      socket: layout.ha.spireServer2Socket,
      log: files.spireServer2Log,
      pid: files.spireServer2Pid,
      telemetryPort: files.spireServer2TelemetryPort,
    };
}

/** The options of server `n` (pure but for reading the password file). */
export async function spireServerOptions(
  ctx: DevenvContext,
  bin: string,
  opts: SpireServerRunOptions,
): Promise<StartServerOptions> {
  const { layout } = ctx;
  const n = opts.server ?? 1;
  if (n === 2 && !opts.ha) throw new CliError("devenv spire-server: --server 2 needs --ha", 2);
  const place = spireServerPlace(ctx, n, opts.ha ?? false);
  const o: StartServerOptions = {
    bin,
    configFile: layout.spireServerConfig,
    cwd: layout.root,
    logFile: place.log,
    detached: false,
    port: place.port,
    // `start --advertise ADDR`: the agent port is where remote robots reach it; the admin
    // socket stays a local unix socket. On the HA stack haproxy's frontend is that port and
    // the servers behind it stay on loopback.
    bindAddress: opts.ha ? "127.0.0.1" : spireServerHost(layout),
    socketPath: place.socket,
    dataDir: place.dataDir,
    trustDomain: layout.trustDomain,
    caTtl: opts.caTtl !== undefined ? `${opts.caTtl}s` : undefined,
    cacheReloadInterval: opts.cacheReloadInterval,
    attestationRateLimit: opts.attestationRateLimit,
    eventsBasedCache: opts.eventsBasedCache,
    agentTtl: opts.agentTtl,
    x509popCaBundle: opts.x509popCaBundle,
    // Prometheus telemetry on loopback (scraped by `devenv start --monitoring`).
    telemetry: { host: "127.0.0.1", port: place.telemetryPort },
    readyTimeoutMs: 60_000,
  };
  if (opts.ha) {
    const password = await readPasswordFile(layout.ha.spirePasswordFile);
    o.datastore = {
      type: "postgres",
      connectionString: keywordValue({
        host: "127.0.0.1",
        port: layout.ha.postgresPort,
        user: SPIRE_DB.role,
        database: SPIRE_DB.database,
      }, password),
    };
    o.secrets = [password];
  }
  if (opts.rootCa) o.upstreamAuthority = upstreamAuthorityOf(caFiles(layout.caDir));
  return o;
}

export async function runSpireServer(
  ctx: DevenvContext,
  opts: SpireServerRunOptions = {},
): Promise<number> {
  const { io } = ctx;
  const bin = opts.bin ?? (await ensureSpireBinaries(io)).server;
  const o = await spireServerOptions(ctx, bin, opts);
  const server = await startSpireServer(io, o);
  const stopped = new Promise<"stop">((resolve) => {
    if (io.signal.aborted) resolve("stop");
    io.signal.addEventListener("abort", () => resolve("stop"), { once: true });
  });
  const why = await Promise.race([stopped, server.exited]);
  if (why === "stop") {
    await server.stop(10_000);
    return 0;
  }
  throw new CliError(`spire-server exited with code ${why} (log: ${o.logFile})`);
}
