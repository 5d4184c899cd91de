import assert from "node:assert/strict";
import { parse } from "yaml";
import { Args } from "../cli/mod.ts";
import { bufferIo } from "../cli/io.ts";
import { devenvComponents, StackView } from "./components.ts";
import { resolveContext, robotLayouts, writeState } from "./context.ts";
import { checkGraph } from "./graph.ts";
import { devenvPrometheusConfig, monitoringOn } from "./monitoring.ts";
import { stopOrder } from "./stop.ts";

function ctxFor(dir: string, env: Record<string, string> = {}) {
  const io = bufferIo({ cwd: dir, env: { XDG_CONFIG_HOME: `${dir}/xdg`, ...env } });
  return resolveContext(new Args(["devenv", "status"], new Map(), [], []), io);
}

Deno.test("--monitoring: a prometheus row (needs its credential and the server), first to stop", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const ctx = ctxFor(dir);
    const robots = robotLayouts(ctx, ["robot-001"]);
    const off = devenvComponents(new StackView(ctx, robots, undefined, false));
    assert.equal(off.find((c) => c.name === "prometheus"), undefined);
    const on = devenvComponents(new StackView(ctx, robots, undefined, true));
    checkGraph(
      on.map((c) => ({
        name: c.name,
        needs: c.needs.map((n) => typeof n === "string" ? n : n.on),
      })),
    );
    const p = on.find((c) => c.name === "prometheus")!;
    assert.deepEqual(p.needs, ["spire-binaries", "operators", "ca-bundle", "server"]);
    assert.equal(p.pidFile, ctx.files.prometheusPid);
    assert.deepEqual(p.logs, [{ name: "prometheus", file: ctx.files.prometheusLog }]);
    // status, logs and stop cover it once a start had --monitoring.
    assert.equal(monitoringOn(ctx), false);
    await Deno.mkdir(ctx.layout.devEnvDir, { recursive: true });
    await writeState(ctx, {
      robots: ["robot-001"],
      monitoring: true,
      createdSocketDirs: [],
      env: {},
    });
    assert.equal(monitoringOn(ctx), true);
    assert.equal(stopOrder(ctx)[0].name, "prometheus");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the dev stack's prometheus.yml: every endpoint on its telemetry port, the server over mTLS", () => {
  const ctx = ctxFor("/p", { K8S4R_TELEMETRY_PORT: "20000", K8S4R_HTTP_PORT: "18090" });
  const doc = parse(devenvPrometheusConfig(ctx, robotLayouts(ctx, ["robot-001", "robot-002"])));
  const job = (name: string) =>
    doc.scrape_configs.find((j: { job_name: string }) => j.job_name === name);
  const targets = (name: string) =>
    job(name).static_configs.map((
      s: { targets: string[]; labels?: Record<string, string> },
    ) => [s.targets[0], s.labels?.node ?? s.labels?.robot ?? ""]);
  assert.deepEqual(targets("k8s4r-server"), [["127.0.0.1:18090", ""]]);
  assert.equal(job("k8s4r-server").scheme, "https");
  assert.deepEqual(job("k8s4r-server").tls_config, {
    ca_file: "/p/config/mosquitto/certs/spire-ca.crt",
    cert_file: "/p/xdg/k8s4r/operators/prometheus/cert.pem",
    key_file: "/p/xdg/k8s4r/operators/prometheus/key.pem",
    server_name: "localhost",
  });
  assert.deepEqual(targets("spire-server"), [["127.0.0.1:20000", ""]]);
  assert.deepEqual(targets("spire-agent"), [
    ["127.0.0.1:20001", "control"],
    ["127.0.0.1:20002", "robot-001"],
    ["127.0.0.1:20004", "robot-002"],
  ]);
  assert.deepEqual(targets("k8s4r-agent"), [
    ["127.0.0.1:20003", "robot-001"],
    ["127.0.0.1:20005", "robot-002"],
  ]);
  assert.deepEqual(doc.rule_files, ["/p/config/prometheus/alerts.yaml"]);
  assert.equal(doc.global.evaluation_interval, "5s");
});

Deno.test("the --ha stack's prometheus.yml: both SPIRE servers and all three fleet servers", () => {
  const ctx = ctxFor("/p", {
    K8S4R_TELEMETRY_PORT: "20000",
    K8S4R_HTTP_PORT: "18090",
    K8S4R_HTTP_PORTS: "18091,18092",
  });
  const robots = robotLayouts(ctx, ["robot-001"]);
  const doc = parse(devenvPrometheusConfig(ctx, robots, true));
  const targets = (name: string) =>
    doc.scrape_configs.find((j: { job_name: string }) => j.job_name === name).static_configs
      .map((s: { targets: string[] }) => s.targets[0]);
  assert.deepEqual(targets("k8s4r-server"), [
    "127.0.0.1:18090",
    "127.0.0.1:18091",
    "127.0.0.1:18092",
  ]);
  assert.deepEqual(targets("spire-server"), ["127.0.0.1:20000", "127.0.0.1:24000"]);
  assert.equal(ctx.files.spireServer2TelemetryPort, 24000);
  // Control: without --ha, one of each.
  const plain = parse(devenvPrometheusConfig(ctx, robots, false));
  assert.equal(
    plain.scrape_configs.find((j: { job_name: string }) => j.job_name === "spire-server")
      .static_configs.length,
    1,
  );
});
