import assert from "node:assert/strict";
import { parse } from "yaml";
import { realRunner } from "../process/mod.ts";
import { checkConfig, promtoolBin } from "./promtool.ts";
import {
  ALERTS_FILE,
  checkLoopbackAddress,
  JOBS,
  prometheusArgs,
  renderPrometheusConfig,
} from "./prometheus_config.ts";

const ROOT = new URL("../../", import.meta.url).pathname;

const input = {
  ruleFiles: [`${ROOT}${ALERTS_FILE}`],
  scrapeIntervalSeconds: 5,
  fleetServers: ["127.0.0.1:8090"],
  spireServers: ["127.0.0.1:9988"],
  spireAgents: [{ node: "broker", address: "127.0.0.1:9989" }, {
    node: "robot-001",
    address: "127.0.0.1:9990",
  }],
  agents: [{ node: "robot-001", address: "[::1]:9464" }],
};

Deno.test("prometheus.yml: every job on loopback, the rules file, accepted by promtool check config", async () => {
  const text = renderPrometheusConfig(input);
  const doc = parse(text);
  assert.deepEqual(doc.global, {
    scrape_interval: "5s",
    scrape_timeout: "5s",
    evaluation_interval: "5s",
  });
  assert.deepEqual(doc.rule_files, [`${ROOT}config/prometheus/alerts.yaml`]);
  const jobs = Object.fromEntries(
    doc.scrape_configs.map((j: { job_name: string }) => [j.job_name, j]),
  );
  assert.deepEqual(Object.keys(jobs), [JOBS.server, JOBS.spireServer, JOBS.spireAgent, JOBS.agent]);
  assert.deepEqual(jobs["k8s4r-server"].static_configs, [{ targets: ["127.0.0.1:8090"] }]);
  assert.deepEqual(jobs["spire-agent"].static_configs[1], {
    targets: ["127.0.0.1:9990"],
    labels: { node: "robot-001" },
  });
  assert.deepEqual(jobs["k8s4r-agent"].static_configs, [{
    targets: ["[::1]:9464"],
    labels: { robot: "robot-001" },
  }]);

  const dir = await Deno.makeTempDir({ prefix: "k8s4r-prom-" });
  try {
    await Deno.writeTextFile(`${dir}/prometheus.yml`, text);
    const r = await checkConfig(
      realRunner,
      `${dir}/prometheus.yml`,
      promtoolBin(Deno.env.toObject()),
    );
    assert.ok(r.ok, r.output);
    assert.match(r.output, /SUCCESS: 9 rules found/, "promtool read the rules file too");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("prometheus.yml: empty jobs are left out; the scrape timeout never exceeds the interval", () => {
  const doc = parse(renderPrometheusConfig({ ruleFiles: [], fleetServers: ["127.0.0.1:1"] }));
  assert.deepEqual(doc.scrape_configs.map((j: { job_name: string }) => j.job_name), [
    "k8s4r-server",
  ]);
  assert.equal(doc.global.scrape_interval, "15s");
  assert.equal(doc.global.scrape_timeout, "10s");
});

Deno.test("prometheus.yml: refuses non-loopback targets and bad values, naming the key", () => {
  assert.throws(
    () => renderPrometheusConfig({ ...input, fleetServers: ["127.0.0.1:8090", "10.0.0.5:8090"] }),
    /^Error: fleetServers\[1\]: expected a loopback address .*got "10\.0\.0\.5:8090"$/,
  );
  assert.throws(
    () =>
      renderPrometheusConfig({ ...input, agents: [{ node: "robot-001", address: "0.0.0.0:1" }] }),
    /agents\[0\]\.address: expected a loopback address/,
  );
  assert.throws(
    () =>
      renderPrometheusConfig({
        ...input,
        spireAgents: [{ node: "Robot 1", address: "127.0.0.1:2" }],
      }),
    /spireAgents\[0\]\.node: expected a robot id or node name, got Robot 1/,
  );
  assert.throws(
    () => renderPrometheusConfig({ ...input, ruleFiles: ["alerts.yaml"] }),
    /absolute path/,
  );
  assert.throws(
    () => renderPrometheusConfig({ ...input, scrapeIntervalSeconds: 0 }),
    /scrapeIntervalSeconds: expected an integer number of seconds in \[1, 3600\], got 0/,
  );
  assert.throws(() => checkLoopbackAddress("127.0.0.1", "x"), /x: expected HOST:PORT/);
  checkLoopbackAddress("localhost:9090", "x"); // positive control
});

Deno.test("prometheus argv: loopback listen address, data dir, config file", () => {
  assert.deepEqual(
    prometheusArgs({
      configFile: "/d/prometheus.yml",
      dataDir: "/d/data",
      listen: "127.0.0.1:9090",
    }),
    [
      "--config.file=/d/prometheus.yml",
      "--storage.tsdb.path=/d/data",
      "--storage.tsdb.retention.time=2d",
      "--web.listen-address=127.0.0.1:9090",
    ],
  );
  assert.throws(
    () => prometheusArgs({ configFile: "c", dataDir: "d", listen: "0.0.0.0:9090" }),
    /listen: expected a loopback address/,
  );
});

Deno.test("prometheus.yml: the fleet server over HTTPS with an operator certificate (tls_config)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const tls = {
      caFile: `${dir}/ca.pem`,
      certFile: `${dir}/cert.pem`,
      keyFile: `${dir}/key.pem`,
      serverName: "localhost",
    };
    const text = renderPrometheusConfig({ ...input, fleetServerTls: tls });
    const job = parse(text).scrape_configs.find((j: { job_name: string }) =>
      j.job_name === JOBS.server
    );
    assert.equal(job.scheme, "https");
    assert.deepEqual(job.tls_config, {
      ca_file: tls.caFile,
      cert_file: tls.certFile,
      key_file: tls.keyFile,
      server_name: "localhost",
    });
    // The other jobs stay plain HTTP on loopback.
    const spire = parse(text).scrape_configs.find((j: { job_name: string }) =>
      j.job_name === JOBS.spireServer
    );
    assert.equal(spire.scheme, undefined);
    // promtool accepts it (it checks that the files exist).
    for (const f of [tls.caFile, tls.certFile, tls.keyFile]) await Deno.writeTextFile(f, "");
    await Deno.writeTextFile(`${dir}/prometheus.yml`, text);
    const r = await checkConfig(
      realRunner,
      `${dir}/prometheus.yml`,
      promtoolBin(Deno.env.toObject()),
    );
    assert.ok(r.ok, r.output);
    assert.throws(
      () => renderPrometheusConfig({ ...input, fleetServerTls: { ...tls, certFile: "cert.pem" } }),
      /fleetServerTls\.certFile: expected an absolute path, got cert\.pem/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
