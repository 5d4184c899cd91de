import assert from "node:assert/strict";
import {
  spireServer2TelemetryPort,
  TELEMETRY_PORT_SPAN,
  telemetryPorts,
  telemetrySlot,
} from "./ports.ts";

Deno.test("telemetry ports: control host 0, robot-NNN N, other ids 1000..1999; two ports each", () => {
  assert.equal(telemetrySlot(undefined), 0);
  assert.equal(telemetrySlot("robot-001"), 1);
  assert.equal(telemetrySlot("robot-999"), 999);
  for (const id of ["robot-000", "robot-1000", "forklift-7", "a"]) {
    const s = telemetrySlot(id);
    assert.ok(s >= 1000 && s < 2000, `${id}: ${s}`);
    assert.equal(telemetrySlot(id), s, "stable");
  }
  assert.deepEqual(telemetryPorts(9800), { spire: 9800, k8s4r: 9801 });
  assert.deepEqual(telemetryPorts(9800, "robot-001"), { spire: 9802, k8s4r: 9803 });
  assert.deepEqual(telemetryPorts(9800, "robot-002"), { spire: 9804, k8s4r: 9805 });
  // Every port of every slot stays inside the span, and no two nodes share one.
  const seen = new Set<number>();
  for (let n = 1; n <= 999; n++) {
    const p = telemetryPorts(0, `robot-${String(n).padStart(3, "0")}`);
    for (const v of [p.spire, p.k8s4r]) {
      assert.ok(v < TELEMETRY_PORT_SPAN && !seen.has(v));
      seen.add(v);
    }
  }
  assert.ok(telemetryPorts(0, "zz-top").k8s4r < TELEMETRY_PORT_SPAN);
  // The HA stack's second SPIRE server: inside the span, above every robot's (hashed ids too).
  const ha = spireServer2TelemetryPort(0);
  assert.ok(ha < TELEMETRY_PORT_SPAN && !seen.has(ha) && ha > telemetryPorts(0).k8s4r);
  for (const id of ["robot-000", "forklift-7", "a", "zz-top"]) {
    assert.ok(telemetryPorts(0, id).k8s4r < ha, id);
  }
  assert.equal(spireServer2TelemetryPort(9800), 13800);
});
