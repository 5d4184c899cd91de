import assert from "node:assert/strict";
import { Args } from "../cli/mod.ts";
import { bufferIo } from "../cli/io.ts";
import { UsageError } from "../cli/errors.ts";
import { checkAdvertise, resolveContext, robotIds, selfCommand, withAdvertise } from "./context.ts";

function args(values: Record<string, string | number>): Args {
  return new Args(["devenv", "start"], new Map(Object.entries(values)), [], []);
}

Deno.test("robot ids: --robots N (0: a control host only), else ROBOT_ID, else robot-001", () => {
  assert.deepEqual(robotIds(3, {}), ["robot-001", "robot-002", "robot-003"]);
  assert.deepEqual(robotIds(undefined, { ROBOT_ID: "arm-7" }), ["arm-7"]);
  assert.deepEqual(robotIds(2, { ROBOT_ID: "arm-7" }), ["robot-001", "robot-002"]);
  assert.deepEqual(robotIds(undefined, {}), ["robot-001"]);
  assert.deepEqual(robotIds(0, { ROBOT_ID: "arm-7" }), []);
  assert.throws(() => robotIds(-1, {}), UsageError);
  assert.throws(() => robotIds(1000, {}), /\[0, 999\]/);
  assert.throws(() => robotIds(undefined, { ROBOT_ID: "Bad Id" }), /ROBOT_ID/);
});

Deno.test("layout: flags override env, env overrides defaults; children get the result", () => {
  const io = bufferIo({
    cwd: "/proj",
    env: {
      K8S4R_MQTT_PORT: "2883",
      K8S4R_HTTP_PORT: "9999",
      K8S4R_AGENT_SOCKET_DIR: "/tmp/s",
      K8S4R_TELEMETRY_PORT: "20000",
    },
  });
  const ctx = resolveContext(
    args({ "http-port": 18090, "project-dir": "sub", "prometheus-port": 19090 }),
    io,
  );
  assert.equal(ctx.layout.root, "/proj/sub");
  assert.deepEqual(ctx.layout.ports, {
    spireServer: 8081,
    mqttPlain: 2883,
    mqttTls: 8883,
    http: 18090,
    telemetry: 20000,
    prometheus: 19090,
  });
  assert.equal(ctx.layoutEnv.K8S4R_HTTP_PORT, "18090");
  assert.equal(ctx.layoutEnv.K8S4R_TELEMETRY_PORT, "20000");
  assert.equal(ctx.layoutEnv.K8S4R_PROMETHEUS_PORT, "19090");
  assert.equal(ctx.files.spireServerTelemetryPort, 20000);
  assert.equal(ctx.files.brokerAgentTelemetryPort, 20001);
  assert.equal(ctx.layoutEnv.K8S4R_AGENT_SOCKET_DIR, "/tmp/s");
  assert.equal(ctx.files.brokerAgentSocket, "/tmp/s/broker/agent.sock");
  assert.equal(ctx.files.spireServerLog, "/proj/sub/.dev-env/spire-server.log");

  const def = resolveContext(args({}), bufferIo({ cwd: "/p", env: {} }));
  assert.equal(def.files.brokerAgentSocket, "/tmp/spire-agent/broker/agent.sock");
  assert.equal(def.layoutEnv.K8S4R_AGENT_SOCKET_DIR, undefined);
  assert.throws(
    () => resolveContext(args({}), bufferIo({ env: { K8S4R_MQTT_TLS_PORT: "x" } })),
    /K8S4R_MQTT_TLS_PORT/,
  );
  assert.throws(() => resolveContext(args({ "mqtt-port": 70000 }), bufferIo()), UsageError);
  assert.throws(
    () => resolveContext(args({}), bufferIo({ env: { K8S4R_TELEMETRY_PORT: "x" } })),
    /K8S4R_TELEMETRY_PORT/,
  );
});

Deno.test("self command runs main.ts from source under deno", () => {
  const s = selfCommand();
  assert.equal(s.cmd, Deno.execPath());
  assert.equal(s.args[0], "run");
  assert.ok(s.args[s.args.length - 1].endsWith("/main.ts"));
});

Deno.test("--advertise: the SPIRE bind host and a second broker listener; children know it", () => {
  const ctx = withAdvertise(resolveContext(args({}), bufferIo({ cwd: "/proj" })), "10.203.4.1");
  assert.equal(ctx.layout.advertise, "10.203.4.1");
  assert.equal(ctx.layoutEnv.K8S4R_ADVERTISE, "10.203.4.1");
  // config/agent/plugins.yaml's spire.serverAddr host: local agents dial the bound address.
  assert.equal(ctx.layoutEnv.K8S4R_SPIRE_SERVER_HOST, "10.203.4.1");
  const back = withAdvertise(ctx, undefined);
  assert.equal(back.layout.advertise, undefined);
  assert.equal(back.layoutEnv.K8S4R_ADVERTISE, undefined);
  for (const bad of ["0.0.0.0", "::", "a b", "-x"]) {
    assert.throws(() => checkAdvertise(bad), /--advertise: expected the address robots dial/);
  }
  assert.equal(checkAdvertise("10.0.0.1"), "10.0.0.1");
});
