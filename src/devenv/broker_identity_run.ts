/**
 * The process behind `k8s4r devenv broker-identity` (hidden; `devenv start` runs it detached).
 * Wires the real pieces into `BrokerIdentity`: a supervised spire-agent for the broker's node,
 * an X509Source on its Workload API, and the broker control of `broker.ts`.
 */
import { errorMessage } from "../cli/errors.ts";
import { X509Source } from "../spiffe/mod.ts";
import { SpireAgentSupervisor } from "../spire/agent.ts";
import { ensureSpireBinaries } from "../spire/binaries.ts";
import { reloadBroker, restartBroker, reviveBroker } from "./broker.ts";
import { isRecordAlive, readPidFile } from "../process/mod.ts";
import { BrokerIdentity } from "./broker_identity.ts";
import type { DevenvContext } from "./context.ts";
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
    serverAddress: "127.0.0.1",
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
  let source: X509Source | undefined;
  try {
    log(`starting spire-agent for ${files.brokerNodeSpiffeId} on ${files.brokerAgentSocket}`);
    await supervisor.start();
    log(`spire-agent serving (pid ${supervisor.pid}); fetching ${spiffeId}`);
    source = await X509Source.create({
      address: `unix://${files.brokerAgentSocket}`,
      spiffeId,
      timeoutMs: 60_000,
      signal: io.signal,
    });
    const bi = new BrokerIdentity(source, {
      certFile: files.brokerCertFile,
      keyFile: files.brokerKeyFile,
      caBundleFile: layout.caBundleFile,
      statusFile: files.brokerIdentityStatus,
      trustDomain: layout.trustDomain,
    }, {
      reload: () => reloadBroker(ctx),
      restart: () => restartBroker(ctx),
    }, log);
    source.onUpdate(() => void bi.update());
    await bi.update();
    log("ready; following SVID and bundle updates");
    const watchdog = brokerWatchdog(ctx, log);
    await new Promise<void>((resolve) => {
      if (io.signal.aborted) return resolve();
      io.signal.addEventListener("abort", () => resolve(), { once: true });
    });
    clearInterval(watchdog);
    log("stopping");
    return 0;
  } catch (err) {
    if (io.signal.aborted) return 0;
    log(`failed: ${errorMessage(err)}`);
    throw err;
  } finally {
    await Promise.resolve(source?.close()).catch(() => {});
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
