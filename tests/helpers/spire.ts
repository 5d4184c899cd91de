import { bufferIo, type Io } from "../../src/cli/io.ts";
import { realRunner } from "../../src/process/mod.ts";
import { findSpireBinaries } from "../../src/spire/binaries.ts";
import { SpireAgentSupervisor, type SupervisorOptions } from "../../src/spire/agent.ts";
import {
  SpireServerCli,
  type SpireServerDaemon,
  type StartServerOptions,
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
 * its admin socket, log and pid file under `tmp`, and the CLI over that socket. `o` overrides
 * any of these (a data dir, a datastore, another socket; `pidFile: undefined` for none).
 */
export async function startTmpSpireServer(
  io: Io,
  bins: { server: string },
  tmp: string,
  port: number,
  o: Partial<StartServerOptions> = {},
): Promise<{ server: SpireServerDaemon; cli: SpireServerCli }> {
  const server = await startSpireServer(io, {
    bin: bins.server,
    configFile: `${REPO}config/spire/server.conf`,
    cwd: tmp,
    port,
    socketPath: `${tmp}/s/api.sock`,
    logFile: `${tmp}/spire-server.log`,
    pidFile: `${tmp}/spire-server.pid`,
    ...o,
  });
  return { server, cli: new SpireServerCli(realRunner, bins.server, server.socketPath) };
}

/**
 * Writes the bundle (`tmp/bundle.pem`) and a 600 s join token (0600) for `nodeId`
 * (`tmp/join.token`); `o` puts them elsewhere. Returns the token (a test checks where it leaks).
 */
export async function bootstrapFiles(
  cli: SpireServerCli,
  tmp: string,
  nodeId: string,
  o: { bundleFile?: string; tokenFile?: string } = {},
): Promise<{ expiresAt: Date; value: string }> {
  await Deno.writeTextFile(o.bundleFile ?? `${tmp}/bundle.pem`, await cli.bundlePem());
  const token = await cli.generateJoinToken(nodeId, 600);
  await Deno.writeTextFile(o.tokenFile ?? `${tmp}/join.token`, token.value, { mode: 0o600 });
  return { expiresAt: token.expiresAt, value: token.value };
}

/**
 * A spire-agent supervisor over `tmp`'s files (`bootstrapFiles`), Workload API at tmp/a/; `o`
 * overrides any option (`pidFile: undefined` for none).
 */
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
