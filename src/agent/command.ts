/**
 * `k8s4r agent --robot-id ID`: runs the robot agent until the signal aborts (SIGINT/SIGTERM),
 * then says offline, disconnects, stops its spire-agent, and exits 0.
 *
 * On a robot host: `k8s4r agent --enroll FILE [--data-dir DIR]` once (enroll.ts), then
 * `k8s4r agent [--data-dir DIR]`; `k8s4r agent csr` makes the x509pop key and CSR, and
 * `k8s4r agent service [--install]` the systemd unit.
 */
import { X509Certificate } from "node:crypto";
import { join, resolve } from "node:path";
import type { Args, CommandSpec } from "../cli/mod.ts";
import { CliError, errorMessage, UsageError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { X509Source } from "../spiffe/mod.ts";
import { type AgentEvent, SpireAgentSupervisor } from "../spire/agent.ts";
import { findSpireBinaries } from "../spire/binaries.ts";
import { type AgentConfig, loadAgentConfig } from "./config.ts";
import { lineLogger, RobotAgent } from "./agent.ts";
import type { Logger } from "./mqtt_session.ts";
import {
  DEFAULT_TASK_USER,
  ensureTaskUser,
  requireTaskUser,
  resolveTaskUser,
  type TaskUser,
} from "./task_user.ts";
import { secureSocketDir } from "../spire/socket_dir.ts";
import { enrollRobot } from "./enroll.ts";
import { robotCsr } from "./x509pop.ts";
import { renderAgentUnit, selfExec } from "./service.ts";
import { judgeAgentSvid, readAgentData } from "../spire/agent_state.ts";
import {
  lockedOutMessage,
  reattestsMessage,
  reenrollHint,
  robotAddCommand,
} from "../fleet/enrollment.ts";
import { AGENT_UNIT_PATH, dataDirFromEnv, robotHostPaths } from "../fleet/paths.ts";
import { isRobotId } from "../fleet/topics.ts";
import { decodePem } from "../spiffe/pem.ts";
import { formatDuration } from "../fleet/duration.ts";
import { formatHostPort } from "../fleet/addresses.ts";
import { type MetricsServer, serveMetrics } from "../metrics/mod.ts";

const csrCommand: CommandSpec = {
  name: "csr",
  summary: "Make this robot's x509pop key (once) and print a CSR for the control host",
  description:
    `Creates an EC P-256 key in DIR/x509pop/agent.key (0600; default /var/lib/k8s4r), which
never leaves this host, and prints a PKCS#10 CSR with CN = the robot id. Run again, it prints a CSR
for the same key. Give the CSR to the control host:
  ${robotAddCommand("ROBOT_ID", "x509pop")}`,
  flags: [
    { name: "robot-id", type: "string", valueName: "ID", description: "The robot's id (the CN)" },
    {
      name: "data-dir",
      type: "string",
      valueName: "DIR",
      description: "The robot's data dir (default /var/lib/k8s4r)",
    },
    { name: "out", type: "string", valueName: "FILE", description: "Write the CSR here too" },
  ],
  async run(args, io) {
    const id = args.string("robot-id");
    if (!id) throw new UsageError("agent csr: --robot-id ID is required");
    if (!isRobotId(id)) {
      throw new UsageError(`agent csr: --robot-id: expected [a-z0-9][a-z0-9-]{0,62}, got '${id}'`);
    }
    const dd = dataDirFromEnv(args.string("data-dir"), io.env);
    const paths = robotHostPaths(dd !== undefined ? resolve(io.cwd, dd) : undefined);
    const r = await robotCsr(id, paths);
    const out = args.string("out");
    if (out) await Deno.writeTextFile(resolve(io.cwd, out), r.csrPem);
    io.stdout.write(r.csrPem);
    io.stderr.write(
      `${
        r.created ? "created" : "kept"
      } the x509pop key ${r.keyPath} (0600, it never leaves this host); on the control host run: ${
        robotAddCommand(id, "x509pop")
      }\n`,
    );
    return 0;
  },
};

const serviceCommand: CommandSpec = {
  name: "service",
  summary: "Print (or --install) the hardened systemd unit that runs this robot",
  description: `Prints the unit; --install writes it to ${AGENT_UNIT_PATH}. Then:
  systemctl daemon-reload && systemctl enable --now k8s4r-agent`,
  flags: [
    { name: "install", type: "boolean", description: `Write it to ${AGENT_UNIT_PATH}` },
    {
      name: "data-dir",
      type: "string",
      valueName: "DIR",
      description: "Run with --data-dir DIR instead of the production directories",
    },
    {
      name: "exec",
      type: "string",
      valueName: "PATH",
      description: "The k8s4r executable the unit runs (default: this one)",
    },
    {
      name: "unit-file",
      type: "string",
      valueName: "FILE",
      description: `Where --install writes (default ${AGENT_UNIT_PATH})`,
    },
  ],
  async run(args, io) {
    const exec = args.string("exec");
    const dd = dataDirFromEnv(args.string("data-dir"), io.env);
    const unit = renderAgentUnit({
      exec: exec ? [resolve(io.cwd, exec)] : selfExec(),
      dataDir: dd !== undefined ? resolve(io.cwd, dd) : undefined,
    });
    if (!args.bool("install")) {
      io.stdout.write(unit);
      return 0;
    }
    const file = resolve(io.cwd, args.string("unit-file") ?? AGENT_UNIT_PATH);
    await Deno.writeTextFile(file, unit, { mode: 0o644 });
    await Deno.chmod(file, 0o644);
    io.stdout.write(
      `wrote ${file}; now run: systemctl daemon-reload && systemctl enable --now k8s4r-agent\n`,
    );
    return 0;
  },
};

export const agentCommand: CommandSpec = {
  name: "agent",
  summary: "Run the robot agent: SPIRE agent, SVID, and MQTT over mTLS",
  description:
    `Reads --config FILE, else DIR/agent.yaml of --data-dir DIR, else config/agent/plugins.yaml,
else /etc/k8s4r/agent.yaml (flags override env, env overrides the file). Env: ROBOT_ID,
MQTT_BROKER_URL, SPIRE_JOIN_TOKEN (first attestation only; written to a 0600 file, never put on
a command line or in a log). Logs one line per event to stderr.

On a robot host: 'k8s4r agent --enroll FILE [--data-dir DIR]' validates the enrollment file from
the control host, writes agent.yaml and the state (default /etc/k8s4r, /var/lib/k8s4r,
/run/k8s4r; everything under DIR with --data-dir), attests and connects. Afterwards
'k8s4r agent [--data-dir DIR]' alone runs the robot.`,
  subcommands: [csrCommand, serviceCommand],
  flags: [
    {
      name: "enroll",
      type: "string",
      valueName: "FILE",
      description: "Enroll this robot host with an enrollment file, then run",
    },
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
      description:
        "The agent's data dir (spire.dataDir; env K8S4R_DATA_DIR); without --config, DIR/agent.yaml",
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
    {
      name: "spire-agent-bin",
      type: "string",
      valueName: "PATH",
      description: "The spire-agent to run (default: found and version-checked like devenv's)",
    },
    {
      name: "spire-sync-interval",
      type: "string",
      valueName: "DURATION",
      description: "The managed spire-agent's sync_interval (default: SPIRE's, 5s)",
    },
    {
      name: "metrics-listen",
      type: "string",
      valueName: "HOST:PORT",
      description: "Serve Prometheus metrics on this loopback address (metrics.listen)",
    },
    {
      name: "spire-telemetry",
      type: "string",
      valueName: "HOST:PORT",
      description: "The managed spire-agent's Prometheus telemetry, on loopback (default: none)",
    },
  ],
  run: (args, io) => runAgentCommand(args, io),
};

async function runAgentCommand(args: Args, io: Io): Promise<number> {
  const enroll = args.string("enroll");
  let configFlag = args.string("config");
  if (enroll !== undefined) {
    for (
      const f of [
        "config",
        "robot-id",
        "broker-url",
        "socket",
        "join-token-file",
        "no-manage-spire",
      ]
    ) {
      if (args.has(f)) {
        throw new UsageError(
          `agent: --enroll takes everything from the enrollment file; --${f} cannot be given with it`,
        );
      }
    }
    const dd = dataDirFromEnv(args.string("data-dir"), io.env);
    // As root, tasks run as k8s4r-task (the agent refuses to run them as root): named in
    // agent.yaml and created now, so that allowing a task later is all it takes.
    const root = Deno.uid() === 0;
    const r = await enrollRobot({
      file: resolve(io.cwd, enroll),
      paths: robotHostPaths(dd !== undefined ? resolve(io.cwd, dd) : undefined),
      cwd: io.cwd,
      taskUser: root ? DEFAULT_TASK_USER : undefined,
    });
    if (root) {
      const written = (await loadAgentConfig({
        cwd: io.cwd,
        env: {},
        flags: { config: r.paths.agentConfig },
      }).catch(() => undefined))?.tasks.user;
      if (written === DEFAULT_TASK_USER) {
        const u = await ensureTaskUser(io.runner, DEFAULT_TASK_USER);
        io.stderr.write(
          `task user ${u.name} (uid ${u.uid}${u.created ? ", created" : ""}): tasks run as it\n`,
        );
      }
    }
    io.stderr.write(
      `enrolled ${r.enrollment.robotId} (${r.enrollment.attestation.type}): ${
        r.updatedConfig ? "updated" : "wrote"
      } ${r.paths.agentConfig}; state in ${r.paths.dataDir}; from now on run: k8s4r agent${
        dd !== undefined ? ` --data-dir ${dd}` : ""
      }\n`,
    );
    configFlag = r.paths.agentConfig;
  }
  const config = await loadAgentConfig({
    cwd: io.cwd,
    env: enroll !== undefined
      ? { ...io.env, ROBOT_ID: undefined, MQTT_BROKER_URL: undefined }
      : io.env,
    flags: {
      robotId: args.string("robot-id"),
      config: configFlag,
      brokerUrl: args.string("broker-url"),
      socket: args.string("socket"),
      dataDir: dataDirFromEnv(args.string("data-dir"), io.env),
      joinTokenFile: args.string("join-token-file"),
      heartbeatSeconds: args.number("heartbeat-seconds"),
      noManageSpire: args.bool("no-manage-spire"),
      spireSyncInterval: args.string("spire-sync-interval"),
      spireAgentBin: args.string("spire-agent-bin"),
      metricsListen: args.string("metrics-listen"),
      spireTelemetry: args.string("spire-telemetry"),
    },
  });
  // The token must not reach the environment of anything we start (spire-agent, tasks):
  // `ps e` would show it. It is handed over through a 0600 file instead.
  if (config.spire.joinToken && Deno.env.get("SPIRE_JOIN_TOKEN") === config.spire.joinToken) {
    Deno.env.delete("SPIRE_JOIN_TOKEN");
  }
  const log = lineLogger(io.stderr, config.robotId);
  try {
    await runAgent(config, io, log);
  } catch (err) {
    // An enrollment whose token was already used (the file enrolled another host, or this one
    // before): only the control host can help.
    if (enroll !== undefined && err instanceof CliError && /join token/.test(err.message)) {
      throw new CliError(
        `${err.message}: the enrollment file's join token was already used or revoked`,
        1,
        reenrollHint(config.robotId, "join_token", dataDirFromEnv(args.string("data-dir"), io.env)),
      );
    }
    throw err;
  }
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
  // As root with tasks to run: only as tasks.user. With tasks.user set, the agent must be able
  // to start tasks as that user, or not start; with no task allowed it is not needed (an
  // enrolled robot's agent.yaml names k8s4r-task before anyone creates it).
  requireTaskUser(config.tasks, config.file);
  let taskUser: TaskUser | undefined;
  if (config.tasks.user !== undefined && config.tasks.allow.length > 0) {
    taskUser = await resolveTaskUser(io.runner, config.tasks.user, config.tasks.group);
    log("tasks.user", { user: taskUser.name, uid: taskUser.uid, gid: taskUser.gid });
  } else if (config.tasks.user !== undefined) {
    log("tasks.user", { user: config.tasks.user, checked: false, why: "tasks.allow is empty" });
  }
  let metrics: MetricsServer | undefined;
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
    const ml = config.metrics.listen;
    if (ml) {
      try {
        metrics = serveMetrics(agent.metrics, ml);
      } catch (err) {
        throw new CliError(
          `cannot serve metrics on ${formatHostPort(ml.hostname, ml.port)}: ${errorMessage(err)}`,
          1,
          "choose a free loopback port (metrics.listen in plugins.yaml, or --metrics-listen)",
        );
      }
      log("metrics.listening", { url: metrics.url });
    }
    if (!io.signal.aborted) {
      await new Promise<void>((resolve) =>
        io.signal.addEventListener("abort", () => resolve(), { once: true })
      );
    }
    log("agent.stopping", { reason: "signal" });
  } finally {
    await metrics?.close().catch(() => {});
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
  const s = config.spire;
  const bin = s.agentBin ?? (await findSpireBinaries(io))?.agent;
  if (!bin) {
    throw new CliError(
      "spire-agent binary not found",
      1,
      "run 'k8s4r devenv install', or use --no-manage-spire with a running SPIRE agent",
    );
  }
  const now = Date.now();
  const type = s.nodeAttestor.type;
  if (s.nodeAttestor.type === "x509pop") {
    await checkX509popCertificate(config, s.nodeAttestor.certificatePath, now);
  }
  // The agent SVID SPIRE left in the data dir, judged against the re-attestation rules.
  const verdict = judgeAgentSvid(
    await readAgentData(s.dataDir).catch(() => undefined),
    now,
    type,
  );
  const lockedOut = verdict.kind === "expired" && !verdict.reattestable;
  if (verdict.kind === "expired") {
    log("spire_agent.svid_expired", {
      notAfter: verdict.notAfter.toISOString(),
      reattest: verdict.reattestable ? "x509pop" : "join token needed",
    });
    if (verdict.reattestable) {
      log("spire_agent.reattesting", {
        message: reattestsMessage(config.robotId, verdict.notAfter, now),
      });
    } else if (!s.joinToken && !(s.joinTokenFile && await exists(s.joinTokenFile))) {
      throw new CliError(
        lockedOutMessage(config.robotId, verdict.notAfter, now),
        1,
        reenrollHint(config.robotId, "join_token", dataDirArg(config)),
      );
    }
  }
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
    bin,
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
    syncInterval: s.syncInterval,
    telemetry: s.telemetry,
    nodeAttestor: s.nodeAttestor,
    onEvent: (e: AgentEvent) => {
      const { type, ...rest } = e;
      log(`spire_agent.${type}`, rest);
    },
  });
  try {
    await sup.start();
  } catch (err) {
    // The token it tried was the used one: say what really happened, and what to run.
    if (lockedOut && verdict.kind === "expired" && /join token/i.test(errorMessage(err))) {
      throw new CliError(
        `${lockedOutMessage(config.robotId, verdict.notAfter, now)} (${errorMessage(err)})`,
        1,
        reenrollHint(config.robotId, "join_token", dataDirArg(config)),
      );
    }
    throw err;
  } finally {
    if (ownTokenFile) await Deno.remove(ownTokenFile).catch(() => {});
  }
  return sup;
}

async function exists(path: string): Promise<boolean> {
  return await Deno.stat(path).then(() => true, () => false);
}

/** `--data-dir DIR` for hints, when the robot runs from an enrolled data dir. */
function dataDirArg(config: AgentConfig): string | undefined {
  return config.file && config.file === join(config.spire.dataDir, "agent.yaml")
    ? config.spire.dataDir
    : undefined;
}

/** An x509pop robot whose certificate expired cannot attest: say so before spire-agent tries. */
async function checkX509popCertificate(config: AgentConfig, path: string, now: number) {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(decodePem(await Deno.readTextFile(path))[0].der);
  } catch (err) {
    throw new CliError(
      `the x509pop certificate ${path} cannot be read: ${errorMessage(err)}`,
      1,
      reenrollHint(config.robotId, "x509pop", dataDirArg(config)),
    );
  }
  const notAfter = new Date(cert.validTo);
  if (notAfter.getTime() <= now) {
    throw new CliError(
      `the x509pop certificate of ${config.robotId} (${path}) expired at ${notAfter.toISOString()} (${
        formatDuration(now - notAfter.getTime())
      } ago): SPIRE refuses it`,
      1,
      reenrollHint(config.robotId, "x509pop", dataDirArg(config)),
    );
  }
}
