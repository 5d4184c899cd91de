/**
 * `devenv start --monitoring` against a real stack: a real Prometheus (Debian's) scrapes the
 * fleet server (over mTLS, as the viewer operator `prometheus`), the SPIRE server, every SPIRE
 * agent and every k8s4r agent, with config/prometheus/alerts.yaml.
 *
 * - every target is up;
 * - `promtool check metrics` on every real endpoint: the k8s4r pages (fleet server, agents)
 *   have no problem at all; SPIRE's own pages parse, and every lint problem promtool reports
 *   there is one of SPIRE's naming choices (listed below, about a `spire_*` name), which we do
 *   not control: that is what "passes" means for them, and the counts are printed;
 * - `devenv status` shows Prometheus healthy with its targets;
 * - a robot is stopped (kill -9 of its agent) and K8s4rRobotOffline fires for it, after the
 *   rule's own `for: 1m` (the production rule, not shortened): the case waits for it; the robot
 *   that stays up gets no alert (the control);
 * - `devenv logs prometheus` shows Prometheus' log; teardown stops it (no process, no port).
 */
import assert from "node:assert/strict";
import { waitFor } from "../../src/process/mod.ts";
import {
  type Alert,
  prometheusAlerts,
  prometheusTargets,
  type TargetHealth,
} from "../../src/monitoring/prometheus_api.ts";
import { checkMetrics, promtoolBin } from "../../src/monitoring/promtool.ts";
import { realRunner } from "../../src/process/mod.ts";
import { E2eStack, metric } from "./stack.ts";

const stack = await E2eStack.create({ heartbeatSeconds: 1, robots: 2 });
const e2e = stack.caseRegistrar("e2e monitoring: ");
const prom = `http://127.0.0.1:${stack.ports.prometheus}`;
const T = stack.ports.telemetry;

/** promtool's lint rules that SPIRE v1.13.3's own metric names break. */
const SPIRE_NAMING = [
  /counter metrics should have "_total" suffix$/,
  /metric names should not contain abbreviated units$/,
  /non-histogram and non-summary metrics should not have "_count" suffix$/,
  /non-counter metrics should not have "_total" suffix$/,
  /metric names should be written in 'snake_case' not 'camelCase'$/,
];

let targets: TargetHealth[] = [];

e2e("devenv start --monitoring: Prometheus runs and every target is up", async () => {
  const r = await stack.devenv(...stack.startArgs(), "--monitoring");
  stack.remember();
  assert.equal(r.code, 0, `devenv start --monitoring:\n${r.stdout}\n${r.stderr}`);
  stack.started = true;
  assert.match(r.stdout, /✓ prometheus: started \(pid \d+\), http:\/\/127\.0\.0\.1:\d+/);
  await waitFor(async () => {
    targets = await prometheusTargets(prom);
    return targets.length === 7 && targets.every((t) => t.health === "up");
  }, { timeoutMs: 60_000, intervalMs: 500, what: "7 targets up" }).catch((err) => {
    throw new Error(`${(err as Error).message}: ${JSON.stringify(targets, null, 1)}`);
  });
  const by = (job: string) => targets.filter((t) => t.job === job);
  assert.equal(by("k8s4r-server").length, 1);
  assert.equal(by("spire-server").length, 1);
  assert.deepEqual(by("spire-agent").map((t) => t.labels.node).sort(), [
    "control",
    "robot-001",
    "robot-002",
  ]);
  assert.deepEqual(by("k8s4r-agent").map((t) => t.labels.robot).sort(), ["robot-001", "robot-002"]);
  // The fleet server is scraped over HTTPS, as an operator.
  assert.match(by("k8s4r-server")[0].labels.instance, /^127\.0\.0\.1:\d+$/);
});

e2e("promtool check metrics on every real endpoint of the stack", async () => {
  const client = await stack.operatorClient("prometheus");
  const page = async (url: string, tls = false) => {
    const res = await fetch(url, tls ? { client } : {});
    const text = await res.text();
    assert.equal(res.status, 200, `${url}: ${res.status} ${text.slice(0, 200)}`);
    assert.match(res.headers.get("content-type") ?? "", /^text\/plain/);
    return text;
  };
  const lint = (text: string) => checkMetrics(realRunner, text, promtoolBin(Deno.env.toObject()));
  // Ours: clean, not a single problem.
  const ours = [
    { what: "fleet server", url: `${stack.api}/metrics`, tls: true },
    ...stack.robotIds.map((id, i) => ({
      what: `agent ${id}`,
      url: `http://127.0.0.1:${T + 2 * (i + 1) + 1}/metrics`,
      tls: false,
    })),
  ];
  for (const o of ours) {
    const text = await page(o.url, o.tls);
    const r = await lint(text);
    assert.equal(r.code, 0, `${o.what} (${o.url}): promtool: ${r.output}`);
    metric(`promtool.${o.what.replace(/ /g, "_")}.problems`, 0);
  }
  const fleet = await page(`${stack.api}/metrics`, true);
  assert.match(fleet, /^k8s4r_robots_online 2$/m);
  assert.match(fleet, /^k8s4r_robot_workload_api_up\{robot="robot-002"\} 1$/m);
  // SPIRE's own: they parse (exit 3 is "lint problems only"); each problem is SPIRE's naming.
  const theirs = [
    { what: "spire-server", url: `http://127.0.0.1:${T}/metrics`, prefix: "spire_server_" },
    {
      what: "spire-agent control",
      url: `http://127.0.0.1:${T + 1}/metrics`,
      prefix: "spire_agent_",
    },
    ...stack.robotIds.map((id, i) => ({
      what: `spire-agent ${id}`,
      url: `http://127.0.0.1:${T + 2 * (i + 1)}/metrics`,
      prefix: "spire_agent_",
    })),
  ];
  for (const o of theirs) {
    const text = await page(o.url);
    assert.ok(text.includes(o.prefix), `${o.url} serves ${o.prefix}* metrics`);
    const r = await lint(text);
    assert.ok(r.code === 0 || r.code === 3, `${o.what}: promtool cannot parse it: ${r.output}`);
    for (const p of r.problems) {
      assert.ok(
        p.startsWith(o.prefix) && SPIRE_NAMING.some((re) => re.test(p)),
        `${o.what}: a problem that is not one of SPIRE's naming choices: ${p}`,
      );
    }
    metric(`promtool.${o.what.replace(/ /g, "_")}.spire_naming_problems`, r.problems.length);
  }
});

e2e("devenv status shows Prometheus healthy, with its targets", async () => {
  const r = await stack.devenv("status", "--json");
  assert.equal(r.code, 0, `${r.stdout}\n${r.stderr}`);
  const row = JSON.parse(r.stdout).components.find((c: { name: string }) =>
    c.name === "prometheus"
  );
  assert.ok(row, r.stdout);
  assert.equal(row.healthy, true, JSON.stringify(row));
  assert.equal(row.endpoint, prom);
  assert.match(row.detail, /^7\/7 targets up; firing: none$/);
});

e2e("a robot is stopped: K8s4rRobotOffline fires for it after its `for: 1m`", async () => {
  let alerts: Alert[] = await prometheusAlerts(prom);
  assert.equal(alerts.length, 0, `a healthy stack raises no alert: ${JSON.stringify(alerts)}`);
  const agent = stack.pid(stack.agentPidFile("robot-002"));
  assert.ok(agent);
  const t0 = Date.now();
  Deno.kill(agent.pid, "SIGKILL");
  const find = (name: string, robot: string) =>
    alerts.find((a) => a.labels.alertname === name && a.labels.robot === robot);
  // Pending first: the rule has seen k8s4r_robot_online == 0.
  await waitFor(async () => {
    alerts = await prometheusAlerts(prom);
    return find("K8s4rRobotOffline", "robot-002") !== undefined;
  }, { timeoutMs: 30_000, intervalMs: 500, what: "K8s4rRobotOffline pending for robot-002" });
  const pendingMs = Date.now() - t0;
  assert.equal(find("K8s4rRobotOffline", "robot-002")!.state, "pending");
  await waitFor(async () => {
    alerts = await prometheusAlerts(prom);
    return find("K8s4rRobotOffline", "robot-002")?.state === "firing";
  }, { timeoutMs: 150_000, intervalMs: 1000, what: "K8s4rRobotOffline firing for robot-002" });
  const firingMs = Date.now() - t0;
  metric("monitoring.kill9_to_alert_pending_ms", pendingMs);
  metric("monitoring.kill9_to_alert_firing_ms", firingMs);
  assert.ok(firingMs >= 60_000, `fired ${firingMs} ms after the kill: before its for: 1m?`);
  const a = find("K8s4rRobotOffline", "robot-002")!;
  assert.equal(a.labels.severity, "warning");
  assert.equal(a.labels.job, "k8s4r-server");
  assert.equal(a.annotations.summary, "Robot robot-002 is offline");
  // The control: robot-001 stayed up and has no alert.
  assert.equal(alerts.filter((x) => x.labels.robot === "robot-001").length, 0);
  const st = await stack.devenv("status", "--json");
  const row = JSON.parse(st.stdout).components.find((c: { name: string }) =>
    c.name === "prometheus"
  );
  assert.match(row.detail, /firing: K8s4rRobotOffline \(robot-002\)/);
});

e2e("devenv logs prometheus shows its log", async () => {
  const r = await stack.devenv("logs", "prometheus", "-n", "50");
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /prometheus serving on http:\/\/127\.0\.0\.1:\d+/);
  assert.match(r.stdout, /Server is ready to receive web requests/);
});

e2e("teardown: Prometheus stops with the stack, its port closes", async () => {
  const rec = stack.pid(stack.files.prometheusPid);
  assert.ok(rec, "prometheus runs until stop");
  await stack.teardown();
});
