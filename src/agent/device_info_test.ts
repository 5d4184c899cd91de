import assert from "node:assert/strict";
import { validateRegister } from "../mqtt/messages.ts";
import { deviceInfo, loadAverage } from "./device_info.ts";

Deno.test("device info describes this machine and passes the register validator", () => {
  const d = deviceInfo();
  assert.equal(d.hostname, Deno.hostname());
  assert.ok(d.os.startsWith("linux "), d.os);
  assert.equal(d.arch, Deno.build.arch);
  assert.ok(d.cpus >= 1);
  assert.ok(d.memoryBytes > 1024 * 1024, `memory ${d.memoryBytes}`);
  assert.equal(d.load.length, 3);
  assert.ok(d.uptimeSeconds > 0);
  const r = validateRegister({
    v: 1,
    type: "register",
    robotId: "robot-001",
    ts: new Date().toISOString(),
    spiffeId: "spiffe://k8s4r.example.org/robot/robot-001",
    agentVersion: "0.1.0",
    svidExpiresAt: new Date().toISOString(),
    device: d,
  });
  assert.ok(r.ok, r.ok ? "" : r.error);
  assert.equal(loadAverage().length, 3);
});
