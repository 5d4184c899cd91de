/**
 * Where a robot host keeps k8s4r: the production defaults and the layout of a robot's data
 * directory. `k8s4r agent --enroll` writes these files, `k8s4r agent` runs from them, the systemd
 * unit creates their directories, and `k8s4r doctor` checks them.
 *
 * Production (the systemd unit's ConfigurationDirectory, StateDirectory, RuntimeDirectory):
 *
 *   /etc/k8s4r/agent.yaml           the agent's config (the plugins.yaml format)
 *   /etc/k8s4r/enrollment.json      the enrollment as received, less its join token (0600)
 *   /var/lib/k8s4r/                 the SPIRE agent's data_dir (agent-data.json, keys.json)
 *   /var/lib/k8s4r/trust-bundle.pem the SPIRE bundle the agent bootstraps from
 *   /var/lib/k8s4r/join-token       the join token (0600), first attestation only
 *   /var/lib/k8s4r/x509pop/         the robot's x509pop key (0600, made on the robot) and cert
 *   /var/lib/k8s4r/k8s4r-agent/     the k8s4r agent's own state (spire-agent.conf, its log)
 *   /run/k8s4r/agent.sock           the Workload API socket
 *
 * With `--data-dir DIR` everything lives under DIR: DIR/agent.yaml, DIR/enrollment.json, DIR as
 * the SPIRE data_dir, and DIR/run/agent.sock.
 *
 * /run/k8s4r is a tmpfs directory owned by root (systemd's `RuntimeDirectory=k8s4r`). devenv uses
 * the guide's /tmp/spire-agent/ instead. Either way a socket directory must belong to its user (or
 * root) and be writable by nobody else (src/spire/socket_dir.ts).
 */
import { join, resolve } from "node:path";
import { TRUST_DOMAIN } from "./ids.ts";
import { DEFAULT_PORTS } from "./ports.ts";

export const PRODUCTION_CONFIG_DIR = "/etc/k8s4r";
export const PRODUCTION_STATE_DIR = "/var/lib/k8s4r";
export const PRODUCTION_RUNTIME_DIR = "/run/k8s4r";
export const PRODUCTION_AGENT_CONFIG = join(PRODUCTION_CONFIG_DIR, "agent.yaml");
/** The robot's SPIRE agent Workload API socket (the k8s4r agent's default `spire.socketPath`). */
export const DEFAULT_AGENT_SOCKET = join(PRODUCTION_RUNTIME_DIR, "agent.sock");
/** The systemd unit `k8s4r agent service --install` writes. */
export const AGENT_UNIT_NAME = "k8s4r-agent.service";
export const AGENT_UNIT_PATH = `/etc/systemd/system/${AGENT_UNIT_NAME}`;

export interface RobotHostPaths {
  /** Holds agent.yaml and enrollment.json. */
  configDir: string;
  /** The agent's config, in the plugins.yaml format. */
  agentConfig: string;
  /** The enrollment as received, without its secret (0600). */
  enrollmentRecord: string;
  /** The SPIRE agent's data_dir (spire.dataDir) and the root of k8s4r's state. */
  dataDir: string;
  /** The k8s4r agent's own state (`<dataDir>/k8s4r-agent`, as the agent config derives it). */
  agentStateDir: string;
  /** The trust bundle from the enrollment: spire-agent's trust_bundle_path. */
  trustBundle: string;
  /** The join token (0600), read by spire-agent only for the first attestation. */
  joinTokenFile: string;
  /** The x509pop private key (0600), created on the robot by `k8s4r agent csr`. */
  x509popKey: string;
  /** The x509pop certificate chain (leaf first) from the enrollment. */
  x509popCert: string;
  /** The Workload API socket's directory (0755) and the socket. */
  runtimeDir: string;
  socketPath: string;
}

/** The robot host's files: production defaults, or everything under `dataDir`. */
export function robotHostPaths(dataDir?: string): RobotHostPaths {
  const configDir = dataDir ?? PRODUCTION_CONFIG_DIR;
  const data = dataDir ?? PRODUCTION_STATE_DIR;
  const runtimeDir = dataDir ? join(dataDir, "run") : PRODUCTION_RUNTIME_DIR;
  return {
    configDir,
    agentConfig: join(configDir, "agent.yaml"),
    enrollmentRecord: join(configDir, "enrollment.json"),
    dataDir: data,
    agentStateDir: join(data, "k8s4r-agent"),
    trustBundle: join(data, "trust-bundle.pem"),
    joinTokenFile: join(data, "join-token"),
    x509popKey: join(data, "x509pop", "agent.key"),
    x509popCert: join(data, "x509pop", "agent.crt"),
    runtimeDir,
    socketPath: dataDir ? join(runtimeDir, "agent.sock") : DEFAULT_AGENT_SOCKET,
  };
}

/** The environment variable that stands for `--data-dir DIR` on every robot-host command. */
export const DATA_DIR_ENV = "K8S4R_DATA_DIR";

/** `--data-dir DIR`, else env K8S4R_DATA_DIR, else undefined (the production directories). */
export function dataDirFromEnv(
  flag: string | undefined,
  env: Record<string, string | undefined>,
): string | undefined {
  return flag ?? (env[DATA_DIR_ENV] || undefined);
}

// ---------------------------------------------------------------------------------------------
// The control host (the fleet server's machine). devenv passes its own paths instead (flags),
// so a developer's stack never touches these.

/** The Workload API socket of the SPIRE agent on the control host (the server's own SVID). */
export const CONTROL_AGENT_SOCKET = join(PRODUCTION_RUNTIME_DIR, "control-agent", "agent.sock");

/** The fleet server's roles config: which operator may do what (deny by default). */
export const DEFAULT_ROLES_FILE = join(PRODUCTION_CONFIG_DIR, "roles.yaml");

/** SPIRE's own default admin socket of `spire-server` (what `operator add` mints through). */
export const DEFAULT_SPIRE_SERVER_SOCKET = "/tmp/spire-server/private/api.sock";

/** Where operators' credentials live: `${XDG_CONFIG_HOME:-~/.config}/k8s4r/operators/`. */
export function operatorsDir(env: Record<string, string | undefined>): string {
  const xdg = env["XDG_CONFIG_HOME"];
  const base = xdg && xdg.startsWith("/") ? xdg : `${env["HOME"] ?? "/root"}/.config`;
  return `${base}/k8s4r/operators`;
}

/** The fleet server's URL for a port: `localhost`, the name its certificate carries. */
export function defaultServerUrl(port: number): string {
  return `https://localhost:${port}`;
}

/**
 * What `k8s4r server` uses when its flags do not say, run from `root` (the project directory):
 * the control host's conventions, which `devenv` lays out the same way (src/devenv/layout.ts uses
 * this). `K8S4R_*` variables move the ports and the trust domain, as for every command.
 */
export function serverDefaults(root: string, env: Record<string, string | undefined> = {}): {
  trustDomain: string;
  mqttPlainPort: number;
  httpPort: number;
  /** The fleet server's broker login (written by devenv). */
  credentialsFile: string;
  /** The SQLite registry's directory. */
  dataDir: string;
} {
  const devEnvDir = join(resolve(root), ".dev-env");
  return {
    trustDomain: env["K8S4R_TRUST_DOMAIN"] ?? TRUST_DOMAIN,
    mqttPlainPort: portFromEnv(env, "K8S4R_MQTT_PORT", DEFAULT_PORTS.mqttPlain),
    httpPort: portFromEnv(env, "K8S4R_HTTP_PORT", DEFAULT_PORTS.http),
    credentialsFile: join(devEnvDir, "server-mqtt.json"),
    dataDir: join(devEnvDir, "server-data"),
  };
}

/** A port from `env[name]` when it is all digits, else `fallback`. */
export function portFromEnv(
  env: Record<string, string | undefined>,
  name: string,
  fallback: number,
): number {
  const v = env[name];
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : fallback;
}
