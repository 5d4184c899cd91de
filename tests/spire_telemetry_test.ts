/**
 * SPIRE v1.13.3's own Prometheus telemetry with the block `renderSpireTelemetry` writes: a real
 * spire-server and a join-token spire-agent, each with `telemetry { Prometheus { host = 127.0.0.1
 * port = N } }`, in a temp dir on free loopback ports. Their exporters serve a page promtool
 * parses (its lint finds SPIRE's own naming problems, which we do not choose: reported, not
 * failed). A real Prometheus with the rendered config scrapes both (`up` = 1); after the
 * spire-server is stopped, `up{job="spire-server"}` turns 0 and K8s4rSpireServerDown becomes
 * pending (it fires after its `for: 1m`). Every process is stopped and checked gone.
 */
import assert from "node:assert/strict";
import { freePorts } from "./helpers/ports.ts";
import { spireBinaries } from "./helpers/spire.ts";
import { startTestPrometheus } from "./helpers/prometheus.ts";
import { bufferIo } from "../src/cli/io.ts";
import { type Daemon, processStartTime, realRunner, waitFor } from "../src/process/mod.ts";
import { renderAgentConfig } from "../src/spire/agent.ts";
import { redactJoinTokens } from "../src/spire/redact.ts";
import { renderServerConfig, SpireServerCli, startSpireServer } from "../src/spire/server.ts";
import { renderSpireTelemetry, spireTelemetryUrl } from "../src/spire/telemetry.ts";
import { assertEndpointParses } from "../src/monitoring/testing.ts";
import { JOBS } from "../src/monitoring/prometheus_config.ts";
import { prometheusAlerts, prometheusTargets } from "../src/monitoring/prometheus_api.ts";

const TD = "k8s4r.example.org";

async function servesMetrics(url: string, prefix: string): Promise<boolean> {
  try {
    const res = await fetch(url);
    const text = await res.text();
    return res.status === 200 && text.includes(prefix);
  } catch {
    return false;
  }
}

Deno.test({
  name:
    "real SPIRE telemetry: server and agent exporters on loopback, scraped by a real Prometheus",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const bins = await spireBinaries();
    const tmp = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-tel-" });
    const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner, cwd: tmp });
    const [spirePort, serverTel, agentTel, promPort] = freePorts(4);
    const server = { host: "127.0.0.1", port: serverTel };
    const agentT = { host: "127.0.0.1", port: agentTel };
    const daemons: Daemon[] = [];
    const tokens: string[] = [];
    try {
      const socketPath = `${tmp}/s/api.sock`;
      await Deno.writeTextFile(
        `${tmp}/server.conf`,
        renderServerConfig({ dataDir: `${tmp}/server`, socketPath, port: spirePort }) +
          renderSpireTelemetry(server),
      );
      const spire = await startSpireServer(io, {
        bin: bins.server,
        configFile: `${tmp}/server.conf`,
        cwd: tmp,
        port: spirePort,
        socketPath,
        logFile: `${tmp}/spire-server.log`,
      });
      daemons.push(spire);
      await waitFor(() => servesMetrics(spireTelemetryUrl(server), "spire_server_"), {
        timeoutMs: 20_000,
        intervalMs: 100,
        what: "the SPIRE server's telemetry exporter",
      });

      const cli = new SpireServerCli(realRunner, bins.server, socketPath);
      await Deno.writeTextFile(`${tmp}/bundle.pem`, await cli.bundlePem());
      const token = await cli.generateJoinToken(`spiffe://${TD}/k8s4r/node/tel-robot`, 600);
      tokens.push(token.value);
      await Deno.writeTextFile(`${tmp}/join.token`, token.value, { mode: 0o600 });
      await Deno.writeTextFile(
        `${tmp}/agent.conf`,
        renderAgentConfig({
          trustDomain: TD,
          serverAddress: "127.0.0.1",
          serverPort: spirePort,
          socketPath: `${tmp}/a/agent.sock`,
          dataDir: `${tmp}/agent`,
          trustBundlePath: `${tmp}/bundle.pem`,
          logLevel: "INFO",
        }) + renderSpireTelemetry(agentT),
      );
      await Deno.mkdir(`${tmp}/a`, { mode: 0o700 });
      const agent = await realRunner.spawn({
        name: "spire-agent",
        cmd: bins.agent,
        args: ["run", "-config", `${tmp}/agent.conf`, "-joinTokenFile", `${tmp}/join.token`],
        logFile: `${tmp}/spire-agent.log`,
        logFilter: (line) => redactJoinTokens(line, tokens),
      });
      daemons.push(agent);
      await waitFor(() => servesMetrics(spireTelemetryUrl(agentT), "spire_agent_"), {
        timeoutMs: 30_000,
        intervalMs: 100,
        what: "the SPIRE agent's telemetry exporter",
      });

      // Both pages parse; SPIRE's names break promtool's lint (counters without _total...).
      for (const [name, t] of [["spire-server", server], ["spire-agent", agentT]] as const) {
        const problems = await assertEndpointParses(spireTelemetryUrl(t));
        console.log(`${name} telemetry: promtool lint reports ${problems.length} problems`);
      }
      const page = await (await fetch(spireTelemetryUrl(server))).text();
      assert.match(page, /^spire_server_started\{.*version="1_13_3/m);
      assert.match(page, /^spire_server_manager_x509_ca_rotate_expiration\{/m);

      // A real Prometheus scrapes both exporters with the k8s4r rules.
      const { prom, base } = await startTestPrometheus(tmp, promPort, `${tmp}/prom`, {
        scrapeIntervalSeconds: 1,
        spireServers: [`127.0.0.1:${serverTel}`],
        spireAgents: [{ node: "tel-robot", address: `127.0.0.1:${agentTel}` }],
      });
      daemons.push(prom);
      const health = async (job: string) =>
        (await prometheusTargets(base)).find((t) => t.job === job)?.health;
      await waitFor(
        async () =>
          await health(JOBS.spireServer) === "up" && await health(JOBS.spireAgent) === "up",
        { timeoutMs: 30_000, intervalMs: 100, what: "both SPIRE targets up" },
      );
      const agentTarget = (await prometheusTargets(base)).find((t) => t.job === JOBS.spireAgent)!;
      assert.equal(agentTarget.labels.node, "tel-robot");
      assert.equal(
        (await prometheusAlerts(base)).filter((a) => a.labels.alertname === "K8s4rSpireServerDown")
          .length,
        0,
        "no alert while the SPIRE server is up",
      );

      // The fault: the SPIRE server stops.
      await spire.stop(5000);
      await waitFor(async () => await health(JOBS.spireServer) === "down", {
        timeoutMs: 30_000,
        intervalMs: 100,
        what: "the spire-server target to be down",
      });
      await waitFor(
        async () =>
          (await prometheusAlerts(base)).some((a) =>
            a.labels.alertname === "K8s4rSpireServerDown" && a.state === "pending" &&
            a.labels.instance === `127.0.0.1:${serverTel}`
          ),
        { timeoutMs: 30_000, intervalMs: 100, what: "K8s4rSpireServerDown to be pending" },
      );
      assert.equal(await health(JOBS.spireAgent), "up", "the agent's exporter is still scraped");

      for (const f of ["spire-agent.log", "spire-server.log", "prometheus.log"]) {
        const log = await Deno.readTextFile(`${tmp}/${f}`).catch(() => "");
        assert.ok(!log.includes(token.value), `the join token is in ${f}`);
      }
    } finally {
      const pids = daemons.map((d) => d.pid);
      for (const d of daemons.reverse()) await d.stop(5000).catch(() => {});
      for (const pid of pids) {
        assert.equal(processStartTime(pid), undefined, `pid ${pid} survived the test`);
      }
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
    }
  },
});
