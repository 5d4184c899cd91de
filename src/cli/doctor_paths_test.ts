import assert from "node:assert/strict";
import { LAYOUT, ROOT } from "../doctor/testing.ts";
import { devStackPaths } from "./doctor_paths.ts";

Deno.test("the doctor's test layout is the dev stack's default layout (no drift)", () => {
  const { layout, robot } = devStackPaths(ROOT, {}, "robot-001");
  assert.deepEqual({ ...layout, brokerContainer: LAYOUT.brokerContainer }, LAYOUT);
  assert.match(layout.brokerContainer, /^k8s4r-mosquitto-[0-9a-f]{8}$/);
  assert.equal(robot.agentSocket, "/tmp/spire-agent/agent.sock");
  assert.equal(robot.joinTokenFile, `${ROOT}/.dev-env/tokens/robot-001.token`);
  assert.equal(
    devStackPaths(ROOT, { K8S4R_MOSQUITTO_CONTAINER: "mine" }, "robot-001").layout.brokerContainer,
    "mine",
  );
});
