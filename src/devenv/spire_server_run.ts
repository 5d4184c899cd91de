/**
 * The process behind `k8s4r devenv spire-server` (hidden; `devenv start` runs it detached).
 *
 * spire-server prints every join-token agent's SPIFFE ID, and that ID embeds the token. Its
 * output can only be redacted while it flows through a process of ours, so devenv does not
 * detach spire-server itself: it detaches this small supervisor, which runs spire-server as a
 * child (dying with it, even on kill -9) and writes the redacted log. Stopping this process
 * stops the server.
 */
import { CliError } from "../cli/errors.ts";
import { ensureSpireBinaries } from "../spire/binaries.ts";
import { startSpireServer } from "../spire/server.ts";
import type { DevenvContext } from "./context.ts";

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
}

export async function runSpireServer(
  ctx: DevenvContext,
  opts: SpireServerRunOptions = {},
): Promise<number> {
  const { io, layout, files } = ctx;
  const bin = opts.bin ?? (await ensureSpireBinaries(io)).server;
  const server = await startSpireServer(io, {
    bin,
    configFile: layout.spireServerConfig,
    cwd: layout.root,
    logFile: files.spireServerLog,
    detached: false,
    port: layout.ports.spireServer,
    bindAddress: "127.0.0.1",
    socketPath: layout.spireServerSocket,
    dataDir: layout.spireServerDataDir,
    trustDomain: layout.trustDomain,
    caTtl: opts.caTtl !== undefined ? `${opts.caTtl}s` : undefined,
    cacheReloadInterval: opts.cacheReloadInterval,
    attestationRateLimit: opts.attestationRateLimit,
    eventsBasedCache: opts.eventsBasedCache,
    // Prometheus telemetry on loopback (scraped by `devenv start --monitoring`).
    telemetry: { host: "127.0.0.1", port: files.spireServerTelemetryPort },
    readyTimeoutMs: 60_000,
  });
  const stopped = new Promise<"stop">((resolve) => {
    if (io.signal.aborted) resolve("stop");
    io.signal.addEventListener("abort", () => resolve("stop"), { once: true });
  });
  const why = await Promise.race([stopped, server.exited]);
  if (why === "stop") {
    await server.stop(10_000);
    return 0;
  }
  throw new CliError(`spire-server exited with code ${why} (log: ${files.spireServerLog})`);
}
