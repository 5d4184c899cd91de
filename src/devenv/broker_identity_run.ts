/**
 * The process behind `k8s4r devenv broker-identity` (hidden; `devenv start` runs it detached):
 * `k8s4r broker identity`'s loop (src/broker/follow.ts) with devenv's own pieces: a supervised
 * spire-agent for the broker's node, the broker control of `broker.ts` (its pid file, its
 * recorded command), and a watchdog that starts a dead broker again.
 */
import { errorMessage } from "../cli/errors.ts";
import { SpireAgentSupervisor } from "../spire/agent.ts";
import { ensureSpireBinaries } from "../spire/binaries.ts";
import { reloadBroker, restartBroker, reviveBroker } from "./broker.ts";
import { isRecordAlive, readPidFile } from "../process/mod.ts";
import { followBrokerIdentity } from "../broker/follow.ts";
import type { DevenvContext } from "./context.ts";
import { spireServerHost } from "./layout.ts";
import { brokerSpiffeId } from "../fleet/mod.ts";

export interface BrokerIdentityRunOptions {
  /** spire-agent, as `start` found and checked it; undefined = look it up. */
  bin?: string;
  /** The spire-agent's `experimental.sync_interval`; undefined = SPIRE's default. */
  syncInterval?: string;
}

export async function runBrokerIdentity(
  ctx: DevenvContext,
  opts: BrokerIdentityRunOptions = {},
): Promise<number> {
  const { io, layout, files } = ctx;
  const log = (line: string) => io.stdout.write(`${new Date().toISOString()} ${line}\n`);
  const bin = opts.bin ?? (await ensureSpireBinaries(io)).agent;
  const supervisor = new SpireAgentSupervisor({
    runner: io.runner,
    bin,
    configPath: `${files.brokerAgentDataDir}/agent.conf`,
    logFile: files.brokerAgentLog,
    joinTokenFile: files.brokerJoinTokenFile,
    trustDomain: layout.trustDomain,
    serverAddress: spireServerHost(layout),
    serverPort: layout.ports.spireServer,
    socketPath: files.brokerAgentSocket,
    dataDir: files.brokerAgentDataDir,
    trustBundlePath: layout.caBundleFile,
    logLevel: "INFO",
    syncInterval: opts.syncInterval,
    // Prometheus telemetry on loopback (scraped by `devenv start --monitoring`).
    telemetry: { host: "127.0.0.1", port: files.brokerAgentTelemetryPort },
    readyTimeoutMs: 60_000,
    onEvent: (e) => {
      if (e.type !== "starting" || e.attempt > 0) log(`spire-agent: ${JSON.stringify(e)}`);
    },
  });
  const spiffeId = brokerSpiffeId(layout.trustDomain);
  let watchdog: ReturnType<typeof setInterval> | undefined;
  try {
    log(`starting spire-agent for ${files.brokerNodeSpiffeId} on ${files.brokerAgentSocket}`);
    await supervisor.start();
    log(`spire-agent serving (pid ${supervisor.pid}); fetching ${spiffeId}`);
    await followBrokerIdentity({
      socket: files.brokerAgentSocket,
      spiffeId,
      paths: {
        certFile: files.brokerCertFile,
        keyFile: files.brokerKeyFile,
        caBundleFile: layout.caBundleFile,
        statusFile: files.brokerIdentityStatus,
        trustDomain: layout.trustDomain,
      },
      control: { reload: () => reloadBroker(ctx), restart: () => restartBroker(ctx) },
      log,
      signal: io.signal,
      onReady: () => (watchdog = brokerWatchdog(ctx, log)),
    });
    log("stopping");
    return 0;
  } catch (err) {
    if (io.signal.aborted) return 0;
    log(`failed: ${errorMessage(err)}`);
    throw err;
  } finally {
    if (watchdog !== undefined) clearInterval(watchdog);
    await supervisor.stop();
  }
}

/**
 * The broker's watchdog: a Mosquitto that died (a crash, a kill -9) is started again once it
 * has been gone for a grace period (K8S4R_BROKER_REVIVE_AFTER_MS, default 5 s), so robots
 * recover without anyone running `devenv start`. The grace leaves room for a deliberate restart;
 * the broker lock keeps the watchdog and `devenv start` from starting it twice.
 */
function brokerWatchdog(
  ctx: DevenvContext,
  log: (line: string) => void,
): ReturnType<typeof setInterval> {
  const raw = ctx.io.env["K8S4R_BROKER_REVIVE_AFTER_MS"];
  const graceMs = raw && /^\d+$/.test(raw) ? Number(raw) : 5000;
  let deadSince: number | undefined;
  let busy = false;
  return setInterval(async () => {
    if (busy) return;
    const rec = readPidFile(ctx.files.mosquittoPid);
    if (!rec || isRecordAlive(rec)) {
      deadSince = undefined;
      return;
    }
    deadSince ??= Date.now();
    if (Date.now() - deadSince < graceMs) return;
    busy = true;
    try {
      const what = await reviveBroker(ctx);
      if (what) log(what);
      deadSince = undefined;
    } catch (err) {
      log(`could not restart the broker: ${errorMessage(err)}`);
    } finally {
      busy = false;
    }
  }, 1000);
}
