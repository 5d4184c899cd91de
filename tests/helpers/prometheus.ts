/**
 * A real Prometheus (Debian's package, or K8S4R_PROMETHEUS) for integration tests, with the
 * k8s4r alert rules, on a loopback port of the test's.
 */
import { type Daemon, realRunner } from "../../src/process/mod.ts";
import {
  ALERTS_FILE,
  prometheusArgs,
  type PrometheusConfigInput,
  renderPrometheusConfig,
} from "../../src/monitoring/prometheus_config.ts";
import { prometheusReady } from "../../src/monitoring/prometheus_api.ts";

export const PROMETHEUS = Deno.env.get("K8S4R_PROMETHEUS") || "/usr/bin/prometheus";
const ROOT = new URL("../..", import.meta.url).pathname;

/**
 * Prometheus with the repository's alert rules and `config`'s targets: its config in
 * tmp/prometheus.yml, its log in tmp/prometheus.log, its data in `dataDir`, listening on
 * 127.0.0.1:`port`; resolves once its API answers. `base` is the API's URL.
 */
export async function startTestPrometheus(
  tmp: string,
  port: number,
  dataDir: string,
  config: Omit<PrometheusConfigInput, "ruleFiles">,
): Promise<{ prom: Daemon; base: string }> {
  const configFile = `${tmp}/prometheus.yml`;
  await Deno.writeTextFile(
    configFile,
    renderPrometheusConfig({ ruleFiles: [`${ROOT}${ALERTS_FILE}`], ...config }),
  );
  const base = `http://127.0.0.1:${port}`;
  const prom = await realRunner.spawn({
    name: "prometheus",
    cmd: PROMETHEUS,
    args: prometheusArgs({ configFile, dataDir, listen: `127.0.0.1:${port}` }),
    logFile: `${tmp}/prometheus.log`,
    ready: () => prometheusReady(base),
    readyTimeoutMs: 30_000,
    readyIntervalMs: 100,
  });
  return { prom, base };
}
