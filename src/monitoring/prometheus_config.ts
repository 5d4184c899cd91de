/**
 * The Prometheus configuration for `devenv start --monitoring`: a prometheus.yml that scrapes
 * the fleet servers' `/metrics`, the SPIRE servers' and SPIRE agents' telemetry exporters
 * (`renderSpireTelemetry`, src/spire/telemetry.ts) and, optionally, the k8s4r agents' loopback
 * `/metrics`, with the alert rules of config/prometheus/alerts.yaml. Every target is on
 * loopback, and so is Prometheus (`prometheusArgs`).
 *
 * The YAML is written with npm `yaml`, the project's one YAML library.
 */
import { stringify } from "yaml";
import { isLoopbackHost } from "../fleet/addresses.ts";

/** Job names; alerts.yaml selects `up{job=...}` by these. */
export const JOBS = {
  server: "k8s4r-server",
  agent: "k8s4r-agent",
  spireServer: "spire-server",
  spireAgent: "spire-agent",
} as const;

/** The rules file, relative to the project root. */
export const ALERTS_FILE = "config/prometheus/alerts.yaml";

/** A robot-side target: its `host:port` and whose it is. */
export interface NodeTarget {
  /** Robot id, or another node name (the broker's SPIRE agent: `broker`). */
  node: string;
  address: string;
}

export interface PrometheusConfigInput {
  /** Absolute paths of rule files (normally `<root>/config/prometheus/alerts.yaml`). */
  ruleFiles: string[];
  /** Default 15 s. */
  scrapeIntervalSeconds?: number;
  /** Default: the scrape interval. */
  evaluationIntervalSeconds?: number;
  /** `host:port` of each fleet server's HTTPS API (it serves `/metrics`); the HA stack has 3. */
  fleetServers?: string[];
  /**
   * How Prometheus authenticates to the fleet server's `/metrics` (the API's own rules: an
   * operator certificate whose role grants /metrics): a `metrics` operator's certificate and key, the
   * SPIRE bundle the server's certificate chains to, and the name it carries (`localhost`).
   * Prometheus reads the files again when they change (the credential is renewed). Without it
   * the job scrapes plain HTTP (tests with a bare metrics server).
   */
  fleetServerTls?: { caFile: string; certFile: string; keyFile: string; serverName: string };
  /** `host:port` of each SPIRE server's telemetry exporter; the HA stack has 2. */
  spireServers?: string[];
  /** SPIRE agents' telemetry exporters (label `node`). */
  spireAgents?: NodeTarget[];
  /** k8s4r agents' loopback `/metrics` (label `robot`). */
  agents?: NodeTarget[];
}

/** Checks `host:port` is a loopback address; the error names the key. */
export function checkLoopbackAddress(addr: string, key: string): void {
  const m = /^(\[[0-9a-fA-F:]+\]|[^:\s]+):(\d{1,5})$/.exec(addr);
  if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) {
    throw new Error(`${key}: expected HOST:PORT like 127.0.0.1:9988, got ${JSON.stringify(addr)}`);
  }
  if (!isLoopbackHost(m[1])) {
    throw new Error(
      `${key}: expected a loopback address (127.0.0.1, [::1], localhost), got ${
        JSON.stringify(addr)
      }`,
    );
  }
}

function seconds(v: number, key: string): string {
  if (!Number.isInteger(v) || v < 1 || v > 3600) {
    throw new Error(`${key}: expected an integer number of seconds in [1, 3600], got ${v}`);
  }
  return `${v}s`;
}

/** prometheus.yml as text. */
export function renderPrometheusConfig(c: PrometheusConfigInput): string {
  const scrape = c.scrapeIntervalSeconds ?? 15;
  const evaluation = c.evaluationIntervalSeconds ?? scrape;
  for (const f of c.ruleFiles) {
    if (!f.startsWith("/")) throw new Error(`ruleFiles: expected an absolute path, got ${f}`);
  }
  const jobs: Record<string, unknown>[] = [];
  const job = (
    name: string,
    targets: { address: string; labels?: Record<string, string> }[],
    extra: Record<string, unknown> = {},
  ) => {
    if (targets.length === 0) return;
    jobs.push({
      job_name: name,
      metrics_path: "/metrics",
      ...extra,
      static_configs: targets.map((t) => ({
        targets: [t.address],
        ...(t.labels ? { labels: t.labels } : {}),
      })),
    });
  };
  const addresses = (list: string[] | undefined, key: string) =>
    (list ?? []).map((address, i) => {
      checkLoopbackAddress(address, `${key}[${i}]`);
      return { address };
    });
  const fleet = addresses(c.fleetServers, "fleetServers");
  if (fleet.length > 0) {
    const tls = c.fleetServerTls;
    if (tls) {
      for (const [k, v] of Object.entries({ ...tls, serverName: undefined })) {
        if (v !== undefined && !v.startsWith("/")) {
          throw new Error(`fleetServerTls.${k}: expected an absolute path, got ${v}`);
        }
      }
    }
    job(
      JOBS.server,
      fleet,
      tls
        ? {
          scheme: "https",
          tls_config: {
            ca_file: tls.caFile,
            cert_file: tls.certFile,
            key_file: tls.keyFile,
            server_name: tls.serverName,
          },
        }
        : {},
    );
  }
  job(JOBS.spireServer, addresses(c.spireServers, "spireServers"));
  const nodes = (list: NodeTarget[] | undefined, key: string, label: string) =>
    (list ?? []).map((t, i) => {
      checkLoopbackAddress(t.address, `${key}[${i}].address`);
      if (!/^[a-z0-9][a-z0-9-]{0,62}$/.test(t.node)) {
        throw new Error(`${key}[${i}].node: expected a robot id or node name, got ${t.node}`);
      }
      return { address: t.address, labels: { [label]: t.node } };
    });
  job(JOBS.spireAgent, nodes(c.spireAgents, "spireAgents", "node"));
  job(JOBS.agent, nodes(c.agents, "agents", "robot"));
  const interval = seconds(scrape, "scrapeIntervalSeconds");
  const doc = {
    global: {
      scrape_interval: interval,
      // A scrape must end before the next one starts.
      scrape_timeout: `${Math.min(scrape, 10)}s`,
      evaluation_interval: seconds(evaluation, "evaluationIntervalSeconds"),
    },
    rule_files: c.ruleFiles,
    scrape_configs: jobs,
  };
  return `# Generated by k8s4r (devenv start --monitoring). Do not edit: it is rewritten on start.\n${
    stringify(doc)
  }`;
}

/** argv for `prometheus` (Debian: /usr/bin/prometheus), listening on loopback only. */
export function prometheusArgs(o: {
  configFile: string;
  dataDir: string;
  /** `127.0.0.1:9090` */
  listen: string;
  retention?: string;
}): string[] {
  checkLoopbackAddress(o.listen, "listen");
  return [
    `--config.file=${o.configFile}`,
    `--storage.tsdb.path=${o.dataDir}`,
    `--storage.tsdb.retention.time=${o.retention ?? "2d"}`,
    `--web.listen-address=${o.listen}`,
  ];
}
