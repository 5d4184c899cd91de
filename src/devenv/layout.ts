/**
 * Where the development stack keeps everything, and on which ports it listens. The defaults are
 * the guide's (SPIRE_QUICKSTART): `.dev-env/` for logs and pids, `.spire-data/` for SPIRE data,
 * `/tmp/spire-agent/agent.sock` for robot-001's Workload API socket.
 *
 * devenv, doctor, the agent and the server all read paths from here, so they always agree.
 * Every value can be overridden (flags, env), which is how tests run a stack in a temp dir on
 * free ports without touching a developer's running stack.
 */
import { join, resolve } from "node:path";
import {
  DEFAULT_PORTS,
  nodeSpiffeId,
  type Ports,
  robotSpiffeId,
  spireServer2TelemetryPort,
  telemetryPorts,
} from "../fleet/mod.ts";
import { portFromEnv, serverDefaults } from "../fleet/paths.ts";

export type { Ports };

export interface Layout {
  /** The project directory (holds config/). */
  root: string;
  trustDomain: string;
  ports: Ports;
  /**
   * `--advertise ADDR` (env K8S4R_ADVERTISE): the address robots on other hosts dial. The SPIRE
   * server's agent port binds it (instead of 127.0.0.1) and the broker gets a second mTLS
   * listener on it; 1883, the HTTP API and the admin sockets stay on loopback.
   */
  advertise?: string;
  /** `.dev-env/`: logs, pid files, generated secrets (0700). */
  devEnvDir: string;
  /** `.spire-data/`. */
  spireDataDir: string;
  spireServerDataDir: string;
  /** Admin socket of the SPIRE server. */
  spireServerSocket: string;
  /** The committed SPIRE server config. */
  spireServerConfig: string;
  /** The committed agent config (the guide's plugins.yaml). */
  agentPluginsYaml: string;
  /** The exported trust bundle the broker uses as cafile, and agents bootstrap from. */
  caBundleFile: string;
  /** Generated mosquitto.conf, ACL, password file, broker cert and key. */
  mosquittoDir: string;
  /** `{username, password}` for the server's 1883 login, 0600. */
  serverCredentialsFile: string;
  /** The k8s4r server's registry and task store. */
  serverDataDir: string;
  /** The k8s4r server's roles config (`server --roles`; production: /etc/k8s4r/roles.yaml). */
  serverRolesFile: string;
  /** The root CA and SPIRE's upstream CA (`k8s4r ca init`; `devenv start --root-ca`). */
  caDir: string;
  /** `{username, password}` of the broker's dynamic-security admin (robot remove), 0600. */
  brokerAdminCredentialsFile: string;
  /** What `k8s4r robot add|list|remove` read: this stack's control-host config. */
  controlHostConfig: string;
  /** The factory CA (`--attestation x509pop`): ca.crt, ca.key (0600). */
  factoryCaDir: string;
  /** k8s4r's records of what robot add issued. */
  robotRecords: string;
  /** What `devenv start --ha` adds. */
  ha: HaLayout;
}

/**
 * `devenv start --ha`: PostgreSQL as SPIRE's shared datastore, two SPIRE servers on their own
 * ports, and haproxy on the SPIRE port everyone dials (`ports.spireServer`), in front of both.
 */
export interface HaLayout {
  /** `.dev-env/postgres/` (0700): the cluster, its log, the password files. */
  postgresDir: string;
  postgresDataDir: string;
  postgresPort: number;
  /** The superuser's password (0600), generated at initdb. */
  postgresAdminPasswordFile: string;
  /** The SPIRE servers' role's password (0600); it also goes into their 0600 configs. */
  spirePasswordFile: string;
  /** libpq's password file for the admin tools (0600). */
  pgpassFile: string;
  /** The two SPIRE servers' own ports (haproxy's backends). */
  spireServerPorts: [number, number];
  /** The fleet servers' registry role's password (0600), for `k8s4r server --database`. */
  fleetPasswordFile: string;
  /** HTTP API ports of fleet servers 2 and 3 (server 1 has `ports.http`). */
  httpPorts: [number, number];
  spireServer2DataDir: string;
  spireServer2Socket: string;
  haproxyDir: string;
}

/** The PostgreSQL role and database of SPIRE's datastore on the HA stack. */
export const SPIRE_DB = { role: "spire", database: "spire" } as const;
/** The fleet servers' registry on the HA stack. */
export const FLEET_DB = { role: "k8s4r", database: "k8s4r" } as const;
/** The PostgreSQL superuser devenv's initdb creates. */
export const PG_SUPERUSER = "k8s4r_admin";

/** `"8181,8182"` -> [8181, 8182]; the defaults when unset or malformed. */
function portPair(v: string | undefined, d: [number, number]): [number, number] {
  const m = v !== undefined ? /^(\d+),(\d+)$/.exec(v) : null;
  return m ? [Number(m[1]), Number(m[2])] : d;
}

export function defaultLayout(root: string, env: Record<string, string | undefined> = {}): Layout {
  root = resolve(root);
  const devEnvDir = join(root, ".dev-env");
  const spireDataDir = join(root, ".spire-data");
  const spireServerDataDir = join(spireDataDir, "server");
  const num = (name: string, d: number) => portFromEnv(env, name, d);
  const server = serverDefaults(root, env);
  return {
    root,
    trustDomain: server.trustDomain,
    advertise: env["K8S4R_ADVERTISE"] || undefined,
    ports: {
      spireServer: num("K8S4R_SPIRE_SERVER_PORT", DEFAULT_PORTS.spireServer),
      mqttPlain: server.mqttPlainPort,
      mqttTls: num("K8S4R_MQTT_TLS_PORT", DEFAULT_PORTS.mqttTls),
      http: server.httpPort,
      telemetry: num("K8S4R_TELEMETRY_PORT", DEFAULT_PORTS.telemetry),
      prometheus: num("K8S4R_PROMETHEUS_PORT", DEFAULT_PORTS.prometheus),
    },
    devEnvDir,
    spireDataDir,
    spireServerDataDir,
    spireServerSocket: join(spireServerDataDir, "api.sock"),
    spireServerConfig: join(root, "config", "spire", "server.conf"),
    agentPluginsYaml: join(root, "config", "agent", "plugins.yaml"),
    caBundleFile: join(root, "config", "mosquitto", "certs", "spire-ca.crt"),
    mosquittoDir: join(devEnvDir, "mosquitto"),
    serverCredentialsFile: server.credentialsFile,
    serverDataDir: server.dataDir,
    brokerAdminCredentialsFile: join(devEnvDir, "broker-admin.json"),
    controlHostConfig: join(devEnvDir, "control-host.json"),
    factoryCaDir: join(devEnvDir, "factory-ca"),
    robotRecords: join(devEnvDir, "robots.json"),
    serverRolesFile: join(devEnvDir, "roles.yaml"),
    caDir: join(spireDataDir, "ca"),
    ha: {
      postgresDir: join(devEnvDir, "postgres"),
      postgresDataDir: join(devEnvDir, "postgres", "data"),
      postgresPort: num("K8S4R_POSTGRES_PORT", 55432),
      postgresAdminPasswordFile: join(devEnvDir, "postgres", "admin.password"),
      spirePasswordFile: join(devEnvDir, "postgres", "spire.password"),
      pgpassFile: join(devEnvDir, "postgres", "pgpass"),
      spireServerPorts: portPair(env["K8S4R_SPIRE_SERVER_PORTS"], [8181, 8182]),
      fleetPasswordFile: join(devEnvDir, "postgres", "k8s4r.password"),
      httpPorts: portPair(env["K8S4R_HTTP_PORTS"], [8091, 8092]),
      spireServer2DataDir: join(spireDataDir, "server-2"),
      spireServer2Socket: join(spireDataDir, "server-2", "api.sock"),
      haproxyDir: join(devEnvDir, "haproxy"),
    },
  };
}

/**
 * The environment variables that move a stack's ports (and optionally its socket dir and trust
 * domain): what `defaultLayout` reads. devenv hands it to every child; tests and benchmarks use
 * it to run a stack on free ports.
 */
export function layoutEnv(
  ports: Ports,
  opts: {
    agentSocketDir?: string;
    trustDomain?: string;
    /** `start --advertise ADDR`: where robots on other hosts reach SPIRE and the broker. */
    advertise?: string;
    /** The `--ha` stack's ports. */
    ha?: Pick<HaLayout, "postgresPort" | "spireServerPorts"> & Partial<Pick<HaLayout, "httpPorts">>;
  } = {},
): Record<string, string> {
  const env: Record<string, string> = {
    K8S4R_SPIRE_SERVER_PORT: String(ports.spireServer),
    K8S4R_MQTT_PORT: String(ports.mqttPlain),
    K8S4R_MQTT_TLS_PORT: String(ports.mqttTls),
    K8S4R_HTTP_PORT: String(ports.http),
    K8S4R_TELEMETRY_PORT: String(ports.telemetry),
    K8S4R_PROMETHEUS_PORT: String(ports.prometheus),
  };
  if (opts.trustDomain) env.K8S4R_TRUST_DOMAIN = opts.trustDomain;
  if (opts.advertise) {
    env.K8S4R_ADVERTISE = opts.advertise;
    // config/agent/plugins.yaml's spire.serverAddr: the SPIRE server no longer binds loopback.
    env.K8S4R_SPIRE_SERVER_HOST = opts.advertise;
  }
  if (opts.agentSocketDir) env.K8S4R_AGENT_SOCKET_DIR = opts.agentSocketDir;
  if (opts.ha) {
    env.K8S4R_POSTGRES_PORT = String(opts.ha.postgresPort);
    env.K8S4R_SPIRE_SERVER_PORTS = opts.ha.spireServerPorts.join(",");
    if (opts.ha.httpPorts) env.K8S4R_HTTP_PORTS = opts.ha.httpPorts.join(",");
  }
  return env;
}

/** Per-robot paths. robot-001 uses the guide's socket and data dir; others get their own. */
export interface RobotLayout {
  robotId: string;
  spiffeId: string;
  /** The node alias the robot's SPIRE agent attests as (parent of the workload entry). */
  nodeSpiffeId: string;
  agentSocket: string;
  agentDataDir: string;
  /** Join token file (0600), written by devenv, read by the agent on first attestation only. */
  joinTokenFile: string;
  logFile: string;
  pidFile: string;
  /** Loopback port of the robot's spire-agent Prometheus exporter. */
  spireTelemetryPort: number;
  /** Loopback port of the robot's k8s4r agent `/metrics`. */
  metricsPort: number;
}

export function robotLayout(
  layout: Layout,
  robotId: string,
  env: Record<string, string | undefined> = {},
): RobotLayout {
  const first = robotId === "robot-001";
  const socketBase = env["K8S4R_AGENT_SOCKET_DIR"];
  return {
    robotId,
    spiffeId: robotSpiffeId(layout.trustDomain, robotId),
    nodeSpiffeId: nodeSpiffeId(layout.trustDomain, robotId),
    agentSocket: socketBase
      ? join(socketBase, robotId, "agent.sock")
      : first
      ? "/tmp/spire-agent/agent.sock"
      : `/tmp/spire-agent/${robotId}/agent.sock`,
    agentDataDir: first
      ? join(layout.spireDataDir, "agent")
      : join(layout.spireDataDir, `agent-${robotId}`),
    joinTokenFile: join(layout.devEnvDir, "tokens", `${robotId}.token`),
    logFile: join(layout.devEnvDir, first ? "agent.log" : `agent-${robotId}.log`),
    pidFile: join(layout.devEnvDir, first ? "agent.pid" : `agent-${robotId}.pid`),
    spireTelemetryPort: telemetryPorts(layout.ports.telemetry, robotId).spire,
    metricsPort: telemetryPorts(layout.ports.telemetry, robotId).k8s4r,
  };
}

/** Every file devenv keeps per component (pid, log) plus its own state files. */
export interface DevenvFiles {
  spireServerPid: string;
  spireServerLog: string;
  brokerIdentityPid: string;
  brokerIdentityLog: string;
  /** `{serial, spiffeId, notAfter, lastRenewal, bundleFingerprint, ...}` written by broker-identity. */
  brokerIdentityStatus: string;
  /** The broker's own SPIRE agent (a child of broker-identity). */
  brokerNodeSpiffeId: string;
  brokerAgentSocket: string;
  brokerAgentDataDir: string;
  brokerAgentLog: string;
  brokerJoinTokenFile: string;
  mosquittoPid: string;
  mosquittoLog: string;
  /** The broker's X.509 SVID (leaf + intermediates) and key (0600), written by broker-identity. */
  brokerCertFile: string;
  brokerKeyFile: string;
  /** `{mode, cmd, args}` of the running broker, so broker-identity can restart it the same way. */
  brokerStateFile: string;
  serverPid: string;
  serverLog: string;
  tokensDir: string;
  timingsFile: string;
  /** The SPIRE binaries `start` checked last, with their file stamps. */
  spireBinariesFile: string;
  /** Loopback telemetry of the SPIRE server, and of the control host's (broker's) SPIRE agent. */
  spireServerTelemetryPort: number;
  brokerAgentTelemetryPort: number;
  /** `--ha`: loopback telemetry of the second SPIRE server. */
  spireServer2TelemetryPort: number;
  /** `devenv start --monitoring`: the supervisor's pid and log, and Prometheus' own dir. */
  prometheusPid: string;
  prometheusLog: string;
  /** prometheus.yml, the TSDB (`data/`). */
  prometheusDir: string;
  prometheusConfig: string;
  /** `--ha`: PostgreSQL, the second SPIRE server, haproxy. */
  postgresPid: string;
  postgresLog: string;
  spireServer2Pid: string;
  spireServer2Log: string;
  haproxyPid: string;
  haproxyLog: string;
  haproxyConfig: string;
  /** haproxy's admin socket (`show stat`): which SPIRE servers it sees up. */
  haproxyStatsSocket: string;
  /** Fleet servers 2 and 3 of the HA stack. */
  server2Pid: string;
  server2Log: string;
  server3Pid: string;
  server3Log: string;
}

export function devenvFiles(
  layout: Layout,
  env: Record<string, string | undefined> = {},
): DevenvFiles {
  const d = layout.devEnvDir;
  const socketBase = env["K8S4R_AGENT_SOCKET_DIR"] ?? "/tmp/spire-agent";
  return {
    spireServerPid: join(d, "spire-server.pid"),
    spireServerLog: join(d, "spire-server.log"),
    brokerIdentityPid: join(d, "broker-identity.pid"),
    brokerIdentityLog: join(d, "broker-identity.log"),
    brokerIdentityStatus: join(d, "broker-identity.json"),
    brokerNodeSpiffeId: nodeSpiffeId(layout.trustDomain, "broker"),
    brokerAgentSocket: join(socketBase, "broker", "agent.sock"),
    brokerAgentDataDir: join(layout.spireDataDir, "agent-broker"),
    brokerAgentLog: join(d, "spire-agent-broker.log"),
    brokerJoinTokenFile: join(d, "tokens", "broker.token"),
    mosquittoPid: join(d, "mosquitto.pid"),
    mosquittoLog: join(d, "mosquitto.log"),
    brokerCertFile: join(layout.mosquittoDir, "broker.crt"),
    brokerKeyFile: join(layout.mosquittoDir, "broker.key"),
    brokerStateFile: join(d, "broker.json"),
    serverPid: join(d, "server.pid"),
    serverLog: join(d, "server.log"),
    tokensDir: join(d, "tokens"),
    timingsFile: join(d, "start-timings.json"),
    spireBinariesFile: join(d, "spire-binaries.json"),
    spireServerTelemetryPort: telemetryPorts(layout.ports.telemetry).spire,
    brokerAgentTelemetryPort: telemetryPorts(layout.ports.telemetry).k8s4r,
    spireServer2TelemetryPort: spireServer2TelemetryPort(layout.ports.telemetry),
    prometheusPid: join(d, "prometheus.pid"),
    prometheusLog: join(d, "prometheus.log"),
    prometheusDir: join(d, "prometheus"),
    prometheusConfig: join(d, "prometheus", "prometheus.yml"),
    postgresPid: join(d, "postgres.pid"),
    postgresLog: join(d, "postgres.log"),
    spireServer2Pid: join(d, "spire-server-2.pid"),
    spireServer2Log: join(d, "spire-server-2.log"),
    haproxyPid: join(d, "haproxy.pid"),
    haproxyLog: join(d, "haproxy.log"),
    haproxyConfig: join(layout.ha.haproxyDir, "haproxy.cfg"),
    haproxyStatsSocket: join(layout.ha.haproxyDir, "stats.sock"),
    server2Pid: join(d, "server-2.pid"),
    server2Log: join(d, "server-2.log"),
    server3Pid: join(d, "server-3.pid"),
    server3Log: join(d, "server-3.log"),
  };
}

/** The address agents on this host dial for the SPIRE server: its bind address. */
export function spireServerHost(layout: Layout): string {
  return layout.advertise ?? "127.0.0.1";
}

/** The addresses of the broker's mTLS listeners: loopback, and the advertised one. */
export function brokerTlsBinds(layout: Layout): string[] {
  return layout.advertise ? ["127.0.0.1", layout.advertise] : ["127.0.0.1"];
}
