import assert from "node:assert/strict";
import { renderAgentConfig } from "./agent.ts";
import { attrString, block, parseHcl } from "./hcl.ts";
import { renderServerConfig } from "./server.ts";
import { checkSpireTelemetry, renderSpireTelemetry, spireTelemetryUrl } from "./telemetry.ts";

Deno.test("SPIRE telemetry block: read back by the HCL reader, appended to server and agent configs", () => {
  const text = renderServerConfig() + renderSpireTelemetry({ host: "127.0.0.1", port: 9988 });
  const doc = parseHcl(text);
  const prom = block(block(doc, "telemetry")!, "Prometheus")!;
  assert.equal(attrString(prom, "host")?.value, "127.0.0.1");
  assert.equal(prom.attrs.get("port")?.value, 9988);
  assert.ok(block(doc, "server"), "the server block is still there");
  assert.ok(block(doc, "plugins"));

  const agent = parseHcl(
    renderAgentConfig({
      trustDomain: "k8s4r.example.org",
      serverAddress: "127.0.0.1",
      serverPort: 8081,
      socketPath: "/tmp/a/agent.sock",
      dataDir: "/tmp/a/data",
      trustBundlePath: "/tmp/a/bundle.pem",
      logLevel: "INFO",
    }) + renderSpireTelemetry({ host: "::1", port: 9989 }),
  );
  assert.equal(attrString(block(block(agent, "telemetry")!, "Prometheus")!, "host")?.value, "::1");
  assert.ok(block(agent, "agent"));
});

Deno.test("SPIRE telemetry: loopback only, a valid port, errors name the key", () => {
  assert.throws(
    () => renderSpireTelemetry({ host: "0.0.0.0", port: 9988 }),
    /^Error: telemetry\.Prometheus\.host: expected a loopback address .*got "0\.0\.0\.0"$/,
  );
  assert.throws(
    () => checkSpireTelemetry({ host: "127.0.0.1", port: 70000 }),
    /telemetry\.Prometheus\.port: expected an integer in \[1, 65535\], got 70000/,
  );
  assert.throws(() => checkSpireTelemetry({ host: "127.0.0.1", port: 1.5 }), /got 1\.5/);
  checkSpireTelemetry({ host: "localhost", port: 1 }); // positive control
});

Deno.test("SPIRE telemetry URL", () => {
  assert.equal(
    spireTelemetryUrl({ host: "127.0.0.1", port: 9988 }),
    "http://127.0.0.1:9988/metrics",
  );
  assert.equal(spireTelemetryUrl({ host: "::1", port: 9988 }), "http://[::1]:9988/metrics");
});
