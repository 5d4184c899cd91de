import assert from "node:assert/strict";
import {
  type ComponentStatus,
  logPrefix,
  prefixLines,
  Progress,
  renderJson,
  renderTable,
} from "./render.ts";

const rows: ComponentStatus[] = [
  {
    name: "spire-server",
    running: true,
    pid: 10,
    healthy: true,
    endpoint: "127.0.0.1:8081",
    detail: "",
  },
  {
    name: "mosquitto",
    running: true,
    pid: 11,
    healthy: false,
    endpoint: "0.0.0.0:8883",
    detail: "TLS refused",
  },
  { name: "agent", running: false, pid: null, healthy: false, endpoint: "robot-001", detail: "" },
];

Deno.test("status table: aligned columns, state words, no colour when off", () => {
  assert.equal(
    renderTable(rows, false),
    "COMPONENT     PID  ENDPOINT        STATE      DETAIL\n" +
      "spire-server  10   127.0.0.1:8081  healthy\n" +
      "mosquitto     11   0.0.0.0:8883    unhealthy  TLS refused\n" +
      "agent         -    robot-001       stopped\n",
  );
  assert.ok(!renderTable(rows, false).includes("\x1b"));
  assert.ok(renderTable(rows, true).includes("\x1b[32mhealthy"));
});

Deno.test("status json has exactly the documented keys", () => {
  const parsed = JSON.parse(renderJson(rows));
  assert.deepEqual(Object.keys(parsed), ["components"]);
  assert.deepEqual(Object.keys(parsed.components[0]), [
    "name",
    "running",
    "pid",
    "healthy",
    "endpoint",
    "detail",
  ]);
  assert.equal(parsed.components[2].pid, null);
});

Deno.test("log prefix: padded, coloured only when asked", () => {
  assert.equal(logPrefix("server", 12, 0, false), "server       | ");
  assert.equal(logPrefix("server", 6, 1, true), "\x1b[33mserver | \x1b[0m");
  assert.equal(prefixLines("a\nb\n", "x | "), "x | a\nx | b\n");
  assert.equal(prefixLines("a\nb", "x | "), "x | a\nx | b\n");
  assert.equal(prefixLines("", "x | "), "");
});

Deno.test("progress: plain lines when piped, with step and total elapsed time", async () => {
  let out = "";
  let t = 0;
  const p = new Progress({ write: (s) => void (out += s) }, false, false, () => t);
  await p.step("spire-server", () => {
    t += 1500;
    return Promise.resolve("started (pid 5)");
  });
  await assert.rejects(p.step("mosquitto", () => {
    t += 250;
    return Promise.reject(new Error("port busy\nmore"));
  }));
  assert.equal(
    out,
    "[  1.5s] ✓ spire-server: started (pid 5) (1.5s)\n" +
      "[  1.8s] ✗ mosquitto: port busy (0.3s)\n",
  );
  assert.deepEqual(p.steps.map((s) => [s.name, s.ms, s.ok]), [
    ["spire-server", 1500, true],
    ["mosquitto", 250, false],
  ]);
});

Deno.test("progress: concurrent steps each print their line when they end, with start offsets", async () => {
  let out = "";
  let t = 0;
  const p = new Progress({ write: (s) => void (out += s) }, false, false, () => t);
  let finishA!: () => void;
  const a = p.step("spire-server", () => new Promise<string>((r) => (finishA = () => r("a"))));
  t = 100;
  const b = p.step("mosquitto", () => {
    t = 300;
    return Promise.resolve("b");
  });
  await b;
  finishA();
  await a;
  assert.equal(
    out,
    "[  0.3s] ✓ mosquitto: b (0.2s)\n" +
      "[  0.3s] ✓ spire-server: a (0.3s)\n",
  );
  assert.deepEqual(p.steps.map((s) => [s.name, s.atMs, s.ms]), [
    ["mosquitto", 100, 200],
    ["spire-server", 0, 300],
  ]);
});
