/**
 * SPIRE's Prometheus telemetry, for the server's and the agents' configs:
 *
 *   telemetry {
 *     Prometheus {
 *       host = "127.0.0.1"
 *       port = 9988
 *     }
 *   }
 *
 * SPIRE v1.13.3 then serves `GET http://host:port/metrics` from inside the spire-server or
 * spire-agent process (metric names `spire_server_*` / `spire_agent_*`, with a `host` label).
 * The block is a top-level block, so it is appended to a config that `renderServerConfig` or
 * `renderAgentConfig` produced: `config + renderSpireTelemetry({ host, port })`.
 *
 * Only loopback hosts are accepted: the exporter has no authentication here, and a robot's
 * SPIRE agent must not open a port to its network.
 */
import { isLoopbackHost } from "../fleet/addresses.ts";

export interface SpireTelemetry {
  /** A loopback address (127.0.0.1, ::1, localhost). */
  host: string;
  port: number;
}

/** Throws naming the key and what was expected. */
export function checkSpireTelemetry(t: SpireTelemetry): void {
  if (!isLoopbackHost(t.host)) {
    throw new Error(
      `telemetry.Prometheus.host: expected a loopback address (127.0.0.1, ::1, localhost), got ${
        JSON.stringify(t.host)
      }`,
    );
  }
  if (!Number.isInteger(t.port) || t.port < 1 || t.port > 65535) {
    throw new Error(
      `telemetry.Prometheus.port: expected an integer in [1, 65535], got ${JSON.stringify(t.port)}`,
    );
  }
}

/** The `telemetry { Prometheus { ... } }` block, with a leading blank line. */
export function renderSpireTelemetry(t: SpireTelemetry): string {
  checkSpireTelemetry(t);
  return `
# Prometheus exporter on loopback (scraped by \`devenv start --monitoring\`).
telemetry {
  Prometheus {
    host = ${JSON.stringify(t.host)}
    port = ${t.port}
  }
}
`;
}

/** `http://host:port/metrics` of the exporter the block configures. */
export function spireTelemetryUrl(t: SpireTelemetry): string {
  const h = t.host.includes(":") && !t.host.startsWith("[") ? `[${t.host}]` : t.host;
  return `http://${h}:${t.port}/metrics`;
}
