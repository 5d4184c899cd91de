/**
 * A real Prometheus (Debian's 2.42, /usr/bin/prometheus) with the rendered prometheus.yml and
 * config/prometheus/alerts.yaml, scraping a loopback Deno HTTP server that serves FleetMetrics.
 * It waits (probes, no sleeps) until the target is up and the rules have been evaluated on a
 * healthy fleet (no alert: the control), then breaks two robots and sees the alerts through
 * /api/v1/alerts: K8s4rSvidNotRotated fires at once (no `for`), K8s4rRobotOffline is pending
 * (it fires after its `for: 1m`). Prometheus is stopped in teardown and its pid checked gone.
 */
import assert from "node:assert/strict";
import { freePorts } from "./helpers/ports.ts";
import { PROMETHEUS, startTestPrometheus } from "./helpers/prometheus.ts";
import { type Daemon, processStartTime, waitFor } from "../src/process/mod.ts";
import { metricsResponse } from "../src/metrics/mod.ts";
import { FleetMetrics, type RobotSample } from "../src/server/metrics.ts";
import { JOBS } from "../src/monitoring/prometheus_config.ts";
import {
  type Alert,
  prometheusAlerts,
  prometheusRuleGroups,
  prometheusTargets,
} from "../src/monitoring/prometheus_api.ts";

Deno.test({
  name: "real Prometheus scrapes FleetMetrics with the k8s4r rules and raises robot alerts",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async () => {
    try {
      await Deno.stat(PROMETHEUS);
    } catch {
      throw new Error(
        `${PROMETHEUS} not found: install Debian's prometheus package (apt-get install prometheus) or set K8S4R_PROMETHEUS`,
      );
    }
    const tmp = await Deno.makeTempDir({ prefix: "k8s4r-prometheus-" });
    const [metricsPort, promPort] = freePorts(2);
    const now = Date.now();
    const iso = (s: number) => new Date(now + s * 1000).toISOString();
    const robots: RobotSample[] = ["robot-001", "robot-002", "robot-003"].map((id) => ({
      id,
      online: true,
      lastSeen: iso(0),
      svidIssuedAt: iso(-60),
      svidExpiresAt: iso(3540),
      heartbeatsReceived: 10,
      heartbeatsMissing: 0,
      workloadApiUp: true,
    }));
    const metrics = new FleetMetrics({
      robots: () => robots,
      stats: () => ({ received: {}, dropped: {}, tasksDispatched: 0, publishErrors: 0 }),
      taskCounts: () => ({}),
      mqtt: () => ({ connected: true, connects: 1 }),
    }, { version: "test" });
    let scrapes = 0;
    const ac = new AbortController();
    const http = Deno.serve({
      hostname: "127.0.0.1",
      port: metricsPort,
      signal: ac.signal,
      onListen: () => {},
    }, (req) => {
      scrapes++;
      return metricsResponse(req, metrics);
    });
    const base = `http://127.0.0.1:${promPort}`;
    let prom: Daemon | undefined;
    try {
      ({ prom } = await startTestPrometheus(tmp, promPort, `${tmp}/data`, {
        scrapeIntervalSeconds: 1,
        evaluationIntervalSeconds: 1,
        fleetServers: [`127.0.0.1:${metricsPort}`],
      }));

      // The target is up: Prometheus scraped our page and parsed it.
      await waitFor(async () => {
        const t = (await prometheusTargets(base)).find((x) => x.job === JOBS.server);
        return t?.health === "up";
      }, { timeoutMs: 30_000, intervalMs: 100, what: "the k8s4r-server target to be up" });
      const upAt = Date.now();
      assert.ok(scrapes >= 1);

      // Control: both rule groups evaluated after the target came up, and no alert on a
      // healthy fleet.
      await waitFor(async () => {
        const groups = await prometheusRuleGroups(base);
        return groups.length === 2 &&
          groups.every((g) => Date.parse(g.lastEvaluation) > upAt + 1000);
      }, { timeoutMs: 30_000, intervalMs: 100, what: "the rules to be evaluated" });
      for (const g of await prometheusRuleGroups(base)) {
        for (const r of g.rules) assert.equal(r.health, "ok", `${r.name}: ${r.lastError}`);
      }
      assert.deepEqual(await prometheusAlerts(base), [], "a healthy fleet raises no alert");

      // robot-001 goes offline; robot-002's SVID is 90 % through its lifetime.
      robots[0] = { ...robots[0], online: false };
      robots[1] = { ...robots[1], svidIssuedAt: iso(-3240), svidExpiresAt: iso(360) };
      const find = (alerts: Alert[], name: string, robot: string) =>
        alerts.find((a) => a.labels.alertname === name && a.labels.robot === robot);
      let alerts: Alert[] = [];
      await waitFor(async () => {
        alerts = await prometheusAlerts(base);
        return find(alerts, "K8s4rSvidNotRotated", "robot-002")?.state === "firing" &&
          find(alerts, "K8s4rRobotOffline", "robot-001") !== undefined;
      }, { timeoutMs: 30_000, intervalMs: 100, what: "the robot alerts" });
      const svid = find(alerts, "K8s4rSvidNotRotated", "robot-002")!;
      assert.equal(svid.labels.severity, "warning");
      assert.equal(svid.labels.job, JOBS.server);
      assert.match(svid.annotations.summary, /robot-002's SVID is past 80 %/);
      assert.ok(Number(svid.value) > 0.8 && Number(svid.value) < 1, svid.value);
      const offline = find(alerts, "K8s4rRobotOffline", "robot-001")!;
      assert.equal(offline.state, "pending", "K8s4rRobotOffline waits for its `for: 1m`");
      assert.equal(offline.annotations.summary, "Robot robot-001 is offline");
      // robot-003 stayed healthy: nothing about it.
      assert.equal(alerts.filter((a) => a.labels.robot === "robot-003").length, 0);
      assert.equal(alerts.length, 2, JSON.stringify(alerts));
    } finally {
      const pid = prom?.pid;
      await prom?.stop(5000);
      ac.abort();
      await http.finished;
      if (pid !== undefined) {
        assert.equal(processStartTime(pid), undefined, `prometheus (pid ${pid}) survived stop`);
      }
      await Deno.remove(tmp, { recursive: true });
    }
  },
});
