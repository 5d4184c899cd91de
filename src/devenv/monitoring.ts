/**
 * `devenv start --monitoring`: a real Prometheus (Debian's `/usr/bin/prometheus`, or
 * `$K8S4R_PROMETHEUS`) on loopback, as one more row of the component table, scraping every
 * endpoint of the stack with the alert rules of `config/prometheus/alerts.yaml`:
 *
 * - the fleet server's `/metrics` on its HTTPS API, as the operator `prometheus` (role
 *   `viewer`: the API's own authorization, no second way in), trusting the exported SPIRE
 *   bundle and the server's name `localhost`;
 * - the SPIRE server's and every SPIRE agent's telemetry exporter (`devenv start` always
 *   enables them, on loopback telemetry ports), and every k8s4r agent's loopback `/metrics`;
 * - on the HA stack (`--ha`), both SPIRE servers and all three fleet servers (each on its own
 *   API port; they trust the same bundle and carry the same name).
 *
 * The row's process is `k8s4r devenv prometheus` (hidden), which runs Prometheus as its child
 * (the child dies with it, even on kill -9) and keeps the `prometheus` operator's credential
 * fresh (renewed at 2/3 of its life through the SPIRE server's admin socket, like `operator
 * login`), since Prometheus re-reads the certificate files when they change.
 *
 * prometheus.yml is rendered for the robots the stack knows; a start whose robots changed
 * finds the running Prometheus' config stale (the probe compares it), and restarts it.
 */
import { join } from "node:path";
import { CliError, errorMessage } from "../cli/errors.ts";
import { credentialPaths } from "../operator/credentials.ts";
import { ensureOperator } from "../operator/command.ts";
import { waitFor } from "../process/mod.ts";
import {
  ALERTS_FILE,
  prometheusArgs,
  renderPrometheusConfig,
} from "../monitoring/prometheus_config.ts";
import {
  prometheusAlerts,
  prometheusReady,
  prometheusTargets,
} from "../monitoring/prometheus_api.ts";
import { ensureSpireBinaries } from "../spire/binaries.ts";
import {
  type DevenvContext,
  knownRobots,
  PROBE_INTERVAL_MS,
  readState,
  robotLayouts,
} from "./context.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
import type { ProbeResult } from "./probes.ts";
import type { RobotLayout } from "./layout.ts";

/** The viewer operator Prometheus scrapes the fleet server as. */
export const PROMETHEUS_OPERATOR = "prometheus";

/** Scrape and rule evaluation interval of the dev stack's Prometheus. */
export const DEV_SCRAPE_SECONDS = 5;

export function prometheusBin(env: Record<string, string | undefined>): string {
  return env["K8S4R_PROMETHEUS"] || "/usr/bin/prometheus";
}

export function prometheusUrl(ctx: DevenvContext): string {
  return `http://127.0.0.1:${ctx.layout.ports.prometheus}`;
}

/** The dev stack's prometheus.yml for these robots (`ha`: the `--ha` stack's servers too). */
export function devenvPrometheusConfig(
  ctx: DevenvContext,
  robots: readonly RobotLayout[],
  ha = false,
): string {
  const { layout, files } = ctx;
  const creds = credentialPaths(ctx.io.env, PROMETHEUS_OPERATOR);
  const lo = (port: number) => `127.0.0.1:${port}`;
  return renderPrometheusConfig({
    ruleFiles: [join(layout.root, ALERTS_FILE)],
    scrapeIntervalSeconds: DEV_SCRAPE_SECONDS,
    evaluationIntervalSeconds: DEV_SCRAPE_SECONDS,
    fleetServers: [layout.ports.http, ...(ha ? layout.ha.httpPorts : [])].map(lo),
    fleetServerTls: {
      caFile: layout.caBundleFile,
      certFile: creds.cert,
      keyFile: creds.key,
      serverName: "localhost",
    },
    spireServers: [
      files.spireServerTelemetryPort,
      ...(ha ? [files.spireServer2TelemetryPort] : []),
    ].map(lo),
    spireAgents: [
      { node: "control", address: lo(files.brokerAgentTelemetryPort) },
      ...robots.map((r) => ({ node: r.robotId, address: lo(r.spireTelemetryPort) })),
    ],
    agents: robots.map((r) => ({ node: r.robotId, address: lo(r.metricsPort) })),
  });
}

/** The config for every robot this stack knows (what a running Prometheus should have). */
export function currentPrometheusConfig(ctx: DevenvContext, ha: boolean): string {
  return devenvPrometheusConfig(ctx, robotLayouts(ctx, knownRobots(ctx)), ha);
}

/** Writes prometheus.yml (0600: it names credential files) and checks the rules exist. */
export async function writePrometheusConfig(ctx: DevenvContext, ha: boolean): Promise<void> {
  const rules = join(ctx.layout.root, ALERTS_FILE);
  try {
    await Deno.stat(rules);
  } catch {
    throw new CliError(
      `${rules}: the alert rules are missing`,
      1,
      "devenv --monitoring loads config/prometheus/alerts.yaml of the project directory",
    );
  }
  await writeFileAtomic(ctx.files.prometheusConfig, currentPrometheusConfig(ctx, ha), 0o600);
}

/** Ready, and running the config this stack needs now (its robots). */
export async function probePrometheus(ctx: DevenvContext, ha: boolean): Promise<ProbeResult> {
  const base = prometheusUrl(ctx);
  if (!(await prometheusReady(base))) return { ok: false, detail: `${base}/-/ready: not ready` };
  let onDisk = "";
  try {
    onDisk = await Deno.readTextFile(ctx.files.prometheusConfig);
  } catch { /* none */ }
  if (onDisk !== currentPrometheusConfig(ctx, ha)) {
    return { ok: false, detail: "its prometheus.yml is not this stack's (robots changed)" };
  }
  return { ok: true, detail: "ready" };
}

/** "5/6 targets up (down: k8s4r-agent robot-002); firing: K8s4rRobotOffline (robot-002)". */
export async function prometheusSummary(ctx: DevenvContext): Promise<string> {
  const base = prometheusUrl(ctx);
  try {
    const [targets, alerts] = await Promise.all([prometheusTargets(base), prometheusAlerts(base)]);
    const up = targets.filter((t) => t.health === "up").length;
    const down = targets.filter((t) => t.health !== "up").map((t) =>
      `${t.job} ${t.labels.robot ?? t.labels.node ?? t.instance}`
    );
    const firing = alerts.filter((a) => a.state === "firing").map((a) =>
      `${a.labels.alertname}${a.labels.robot ? ` (${a.labels.robot})` : ""}`
    );
    return `${up}/${targets.length} targets up${
      down.length ? ` (not up: ${down.join(", ")})` : ""
    }; firing: ${firing.length ? firing.join(", ") : "none"}`;
  } catch (err) {
    return `API: ${errorMessage(err)}`;
  }
}

/** Whether `status`, `logs` and `stop` cover Prometheus: the last start had --monitoring. */
export function monitoringOn(ctx: DevenvContext): boolean {
  if (readState(ctx)?.monitoring) return true;
  try {
    Deno.statSync(ctx.files.prometheusPid);
    return true;
  } catch {
    return false;
  }
}

/** Renews the `prometheus` operator's credential when 1/3 of its life is left (or expired). */
async function renewScrapeCredential(
  ctx: DevenvContext,
  spireServerBin: string,
): Promise<string> {
  return await ensureOperator(
    {
      env: ctx.io.env,
      runner: ctx.io.runner,
      spireServerBin,
      spireSocket: ctx.layout.spireServerSocket,
      rolesFile: ctx.layout.serverRolesFile,
      trustDomain: ctx.layout.trustDomain,
      serverUrl: `https://localhost:${ctx.layout.ports.http}`,
    },
    PROMETHEUS_OPERATOR,
    "viewer",
  );
}

/**
 * The process behind `k8s4r devenv prometheus` (hidden; `devenv start --monitoring` runs it
 * detached): Prometheus as a child, and the scrape credential kept fresh. Stopping it stops
 * Prometheus.
 */
export async function runPrometheus(
  ctx: DevenvContext,
  opts: { spireServerBin?: string; renewEveryMs?: number } = {},
): Promise<number> {
  const { io, layout, files } = ctx;
  const log = (line: string) => io.stdout.write(`${new Date().toISOString()} ${line}\n`);
  const bin = prometheusBin(io.env);
  const spireServer = opts.spireServerBin ?? (await ensureSpireBinaries(io)).server;
  await Deno.mkdir(join(files.prometheusDir, "data"), { recursive: true, mode: 0o700 });
  const base = prometheusUrl(ctx);
  let prom;
  try {
    prom = await io.runner.spawn({
      name: "prometheus",
      cmd: bin,
      args: prometheusArgs({
        configFile: files.prometheusConfig,
        dataDir: join(files.prometheusDir, "data"),
        listen: `127.0.0.1:${layout.ports.prometheus}`,
      }),
      cwd: files.prometheusDir,
      logFile: files.prometheusLog,
      detached: false,
      ready: () => prometheusReady(base),
      readyTimeoutMs: 60_000,
      readyIntervalMs: 100,
    });
  } catch (err) {
    if (/not found|No such file|ENOENT/i.test(errorMessage(err))) {
      throw new CliError(
        `${bin}: not found`,
        1,
        "install Debian's prometheus package (apt-get install prometheus) or set K8S4R_PROMETHEUS",
      );
    }
    throw err;
  }
  log(`prometheus serving on ${base} (pid ${prom.pid})`);
  const renew = setInterval(() => {
    renewScrapeCredential(ctx, spireServer).then(
      (what) => /written/.test(what) && log(what),
      (err) => log(`renewing the scrape credential failed: ${errorMessage(err)}`),
    );
  }, opts.renewEveryMs ?? 60_000);
  try {
    const stopped = new Promise<"stop">((resolve) => {
      if (io.signal.aborted) resolve("stop");
      io.signal.addEventListener("abort", () => resolve("stop"), { once: true });
    });
    const why = await Promise.race([stopped, prom.exited]);
    if (why !== "stop") {
      throw new CliError(`prometheus exited with code ${why} (log: ${files.prometheusLog})`);
    }
    return 0;
  } finally {
    clearInterval(renew);
    await prom.stop(10_000);
    log("stopped");
  }
}

/** Waits until Prometheus has loaded the rules (every group evaluated once). For start. */
export async function awaitPrometheusRules(ctx: DevenvContext, timeoutMs = 30_000): Promise<void> {
  const base = prometheusUrl(ctx);
  await waitFor(async () => {
    try {
      const res = await fetch(`${base}/api/v1/rules`);
      const body = await res.json();
      return body?.data?.groups?.length > 0;
    } catch {
      return false;
    }
  }, { timeoutMs, intervalMs: PROBE_INTERVAL_MS * 5, what: "Prometheus to load the alert rules" });
}
