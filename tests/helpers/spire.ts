import { bufferIo, type Io } from "../../src/cli/io.ts";
import { realRunner } from "../../src/process/mod.ts";
import { findSpireBinaries } from "../../src/spire/binaries.ts";
import { SpireAgentSupervisor, type SupervisorOptions } from "../../src/spire/agent.ts";
import {
  SpireServerCli,
  type SpireServerDaemon,
  startSpireServer,
} from "../../src/spire/server.ts";

/**
 * The provisioned SPIRE v1.13.3 binaries, found the way k8s4r finds them. A test that needs real
 * SPIRE fails here, saying how to provision it, instead of skipping.
 */
export async function spireBinaries(): Promise<{ server: string; agent: string }> {
  const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner });
  const bins = await findSpireBinaries(io);
  if (!bins) {
    throw new Error(
      "SPIRE 1.13.3 binaries are not provisioned (K8S4R_SPIRE_BIN_DIR, ~/.cache/k8s4r/spire/1.13.3/bin, PATH): run `k8s4r devenv install`",
    );
  }
  return bins;
}

const REPO = new URL("../..", import.meta.url).pathname;

/**
 * A SPIRE server from the committed config, run from `tmp` (its ./.spire-data paths land there),
 * its admin socket, log and pid file under `tmp`, and the CLI over that socket.
 */
export async function startTmpSpireServer(
  io: Io,
  bins: { server: string },
  tmp: string,
  port: number,
): Promise<{ server: SpireServerDaemon; cli: SpireServerCli }> {
  const server = await startSpireServer(io, {
    bin: bins.server,
    configFile: `${REPO}config/spire/server.conf`,
    cwd: tmp,
    port,
    socketPath: `${tmp}/s/api.sock`,
    logFile: `${tmp}/spire-server.log`,
    pidFile: `${tmp}/spire-server.pid`,
  });
  return { server, cli: new SpireServerCli(realRunner, bins.server, server.socketPath) };
}

/** Writes `tmp/bundle.pem` and a join token (0600) for `nodeId` in `tmp/join.token`. */
export async function bootstrapFiles(
  cli: SpireServerCli,
  tmp: string,
  nodeId: string,
): Promise<{ expiresAt: Date }> {
  await Deno.writeTextFile(`${tmp}/bundle.pem`, await cli.bundlePem());
  const token = await cli.generateJoinToken(nodeId, 600);
  await Deno.writeTextFile(`${tmp}/join.token`, token.value, { mode: 0o600 });
  return { expiresAt: token.expiresAt };
}

/** A spire-agent supervisor over `tmp`'s files (`bootstrapFiles`), Workload API at tmp/a/. */
export function tmpSpireAgent(
  bins: { agent: string },
  tmp: string,
  o: { trustDomain: string; serverPort: number } & Partial<SupervisorOptions>,
): SpireAgentSupervisor {
  return new SpireAgentSupervisor({
    runner: realRunner,
    bin: bins.agent,
    configPath: `${tmp}/agent/agent.conf`,
    dataDir: `${tmp}/agent/data`,
    socketPath: `${tmp}/a/agent.sock`,
    logFile: `${tmp}/spire-agent.log`,
    pidFile: `${tmp}/spire-agent.pid`,
    trustBundlePath: `${tmp}/bundle.pem`,
    joinTokenFile: `${tmp}/join.token`,
    serverAddress: "127.0.0.1",
    logLevel: "INFO",
    ...o,
  });
}
