/**
 * `k8s4r agent --robot-id ID`: runs the robot agent until the signal aborts (SIGINT/SIGTERM),
 * then says offline, disconnects, stops its spire-agent, and exits 0.
 */
import { join } from "node:path";
import type { Args, CommandSpec } from "../cli/mod.ts";
import { CliError, errorMessage } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { X509Source } from "../spiffe/mod.ts";
import { type AgentEvent, SpireAgentSupervisor } from "../spire/agent.ts";
import { findSpireBinaries } from "../spire/binaries.ts";
import { type AgentConfig, loadAgentConfig } from "./config.ts";
import { lineLogger, RobotAgent } from "./agent.ts";
import type { Logger } from "./mqtt_session.ts";
import { resolveTaskUser, type TaskUser } from "./task_user.ts";
import { secureSocketDir } from "../spire/socket_dir.ts";

export const agentCommand: CommandSpec = {
  name: "agent",
  summary: "Run the robot agent: SPIRE agent, SVID, and MQTT over mTLS",
  description: `Reads config/agent/plugins.yaml (flags override env, env overrides the file).
Env: ROBOT_ID, MQTT_BROKER_URL, SPIRE_JOIN_TOKEN (first attestation only; written to a 0600
file, never put on a command line or in a log). Logs one line per event to stderr.`,
  flags: [
    { name: "robot-id", type: "string", valueName: "ID", description: "Robot id (env ROBOT_ID)" },
    {
      name: "config",
      type: "string",
      valueName: "FILE",
      description: "Agent config (default config/agent/plugins.yaml)",
    },
    {
      name: "broker-url",
      type: "string",
      valueName: "URL",
      description: "Broker, ssl:// mqtts:// or tls:// (env MQTT_BROKER_URL)",
    },
    {
      name: "socket",
      type: "string",
      valueName: "PATH",
      description: "SPIRE agent Workload API socket (spire.socketPath)",
    },
    {
      name: "data-dir",
      type: "string",
      valueName: "DIR",
      description: "SPIRE agent data directory (spire.dataDir)",
    },
    {
      name: "join-token-file",
      type: "string",
      valueName: "FILE",
      description: "0600 file with a join token, for the first attestation",
    },
    {
      name: "heartbeat-seconds",
      type: "number",
      valueName: "N",
      description: "Heartbeat interval (default 10)",
    },
    {
      name: "no-manage-spire",
      type: "boolean",
      description: "Use an already running SPIRE agent at the socket",
    },
  ],
  run: (args, io) => runAgentCommand(args, io),
};

async function runAgentCommand(args: Args, io: Io): Promise<number> {
  const config = await loadAgentConfig({
    cwd: io.cwd,
    env: io.env,
    flags: {
      robotId: args.string("robot-id"),
      config: args.string("config"),
      brokerUrl: args.string("broker-url"),
      socket: args.string("socket"),
      dataDir: args.string("data-dir"),
      joinTokenFile: args.string("join-token-file"),
      heartbeatSeconds: args.number("heartbeat-seconds"),
      noManageSpire: args.bool("no-manage-spire"),
    },
  });
  // The token must not reach the environment of anything we start (spire-agent, tasks):
  // `ps e` would show it. It is handed over through a 0600 file instead.
  if (config.spire.joinToken && Deno.env.get("SPIRE_JOIN_TOKEN") === config.spire.joinToken) {
    Deno.env.delete("SPIRE_JOIN_TOKEN");
  }
  const log = lineLogger(io.stderr, config.robotId);
  await runAgent(config, io, log);
  return 0;
}

/** Starts the managed spire-agent (if any), then the agent; stops both when io.signal aborts. */
export async function runAgent(config: AgentConfig, io: Io, log: Logger): Promise<void> {
  log("agent.starting", {
    spiffeId: config.spiffeId,
    broker: config.mqtt.brokerUrl,
    brokerId: config.mqtt.brokerSpiffeId,
    socket: config.spire.socketPath,
    manageSpire: config.spire.manage,
    config: config.file ?? "(none)",
  });
  let spire: SpireAgentSupervisor | undefined;
  let source: X509Source | undefined;
  let agent: RobotAgent | undefined;
  // With tasks.user set, the agent must be able to start tasks as that user, or not start.
  let taskUser: TaskUser | undefined;
  if (config.tasks.user !== undefined) {
    taskUser = await resolveTaskUser(io.runner, config.tasks.user, config.tasks.group);
    log("tasks.user", { user: taskUser.name, uid: taskUser.uid, gid: taskUser.gid });
  }
  try {
    if (config.spire.manage) spire = await startSpire(config, io, log);
    // Someone else's SPIRE agent: its socket directory must still be its user's (or root's).
    else await secureSocketDir(config.spire.socketPath, { create: false });
    try {
      source = await X509Source.create({
        address: `unix://${config.spire.socketPath}`,
        spiffeId: config.spiffeId,
        timeoutMs: 30_000,
        signal: io.signal,
        onError: (err) => log("workload_api.error", { error: errorMessage(err) }),
      });
    } catch (err) {
      if (io.signal.aborted) return;
      throw new CliError(
        `no SVID for ${config.spiffeId} from the SPIRE agent at ${config.spire.socketPath}: ${
          errorMessage(err)
        }`,
        1,
        `register the workload: spire-server entry create -spiffeID ${config.spiffeId} -dns ${config.robotId} ...`,
      );
    }
    const svid = source.getX509Svid();
    if (svid.id.toString() !== config.spiffeId) {
      throw new CliError(`the SPIRE agent gave ${svid.id}, expected ${config.spiffeId}`);
    }
    log("svid.ready", { spiffeId: svid.id.toString(), expires: svid.notAfter.toISOString() });
    agent = new RobotAgent({ config, source, log, cwd: io.cwd, taskUser });
    try {
      await agent.start();
    } catch (err) {
      throw new CliError(
        `cannot start the agent: ${errorMessage(err)}`,
        1,
        `the agent keeps its task ids, running tasks and outbound queue in ${config.stateDir}: it must be a writable directory`,
      );
    }
    if (!io.signal.aborted) {
      await new Promise<void>((resolve) =>
        io.signal.addEventListener("abort", () => resolve(), { once: true })
      );
    }
    log("agent.stopping", { reason: "signal" });
  } finally {
    await agent?.stop("agent stopped").catch((err) =>
      log("agent.stop_error", { error: errorMessage(err) })
    );
    await source?.close().catch(() => {});
    if (spire) {
      await spire.stop();
      log("spire_agent.stopped", {});
    }
  }
}

async function startSpire(
  config: AgentConfig,
  io: Io,
  log: Logger,
): Promise<SpireAgentSupervisor> {
  const bins = await findSpireBinaries(io);
  if (!bins) {
    throw new CliError(
      "spire-agent binary not found",
      1,
      "run 'k8s4r devenv install', or use --no-manage-spire with a running SPIRE agent",
    );
  }
  const s = config.spire;
  // A token from the environment goes to a 0600 file (never argv), deleted after attestation.
  let tokenFile = s.joinTokenFile;
  let ownTokenFile: string | undefined;
  if (!tokenFile && s.joinToken) {
    await Deno.mkdir(config.stateDir, { recursive: true, mode: 0o700 });
    ownTokenFile = join(config.stateDir, "join-token");
    await Deno.writeTextFile(ownTokenFile, s.joinToken, { mode: 0o600 });
    await Deno.chmod(ownTokenFile, 0o600);
    tokenFile = ownTokenFile;
  }
  const sup = new SpireAgentSupervisor({
    runner: io.runner,
    bin: bins.agent,
    configPath: join(config.stateDir, "spire-agent.conf"),
    dataDir: s.dataDir,
    socketPath: s.socketPath,
    logFile: join(config.stateDir, "spire-agent.log"),
    trustBundlePath: s.trustBundlePath,
    joinTokenFile: tokenFile,
    trustDomain: s.trustDomain,
    serverAddress: s.serverHost,
    serverPort: s.serverPort,
    logLevel: s.logLevel,
    onEvent: (e: AgentEvent) => {
      const { type, ...rest } = e;
      log(`spire_agent.${type}`, rest);
    },
  });
  try {
    await sup.start();
  } finally {
    if (ownTokenFile) await Deno.remove(ownTokenFile).catch(() => {});
  }
  return sup;
}
