import assert from "node:assert/strict";
import { entriesJson, renderSimAgentConfig } from "./provision.ts";

Deno.test("entriesJson writes the v1.13.3 -data shape: string IDs, selector objects, DNS", () => {
  const json = JSON.parse(entriesJson([{
    spiffeId: "spiffe://td.example/robot/sim-00001",
    parentId: "spiffe://td.example/k8s4r/node/sim",
    dnsName: "sim-00001",
    selectors: ["unix:uid:0", "unix:gid:0"],
    x509SvidTtl: 60,
  }]));
  assert.deepEqual(json, {
    entries: [{
      spiffe_id: "spiffe://td.example/robot/sim-00001",
      parent_id: "spiffe://td.example/k8s4r/node/sim",
      selectors: [{ type: "unix", value: "uid:0" }, { type: "unix", value: "gid:0" }],
      dns_names: ["sim-00001"],
      x509_svid_ttl: 60,
    }],
  });
});

Deno.test("entriesJson refuses a malformed SPIFFE ID", () => {
  assert.throws(
    () =>
      entriesJson([{
        spiffeId: "robot/sim-1",
        parentId: "spiffe://td.example/k8s4r/node/sim",
        dnsName: "sim-1",
        selectors: ["unix:uid:0"],
      }]),
    /invalid SPIFFE ID "robot\/sim-1"/,
  );
});

Deno.test("the simulator node's agent config raises the SVID cache and syncs often", () => {
  const conf = renderSimAgentConfig({
    trustDomain: "td.example",
    serverPort: 18081,
    socketPath: "/tmp/x/agent.sock",
    dataDir: "/tmp/x/data",
    trustBundlePath: "/tmp/x/bundle.pem",
    svidCacheSize: 5000,
    syncInterval: "1s",
  });
  assert.match(conf, /x509_svid_cache_max_size = 5000/);
  assert.match(conf, /sync_interval = "1s"/);
  assert.match(conf, /server_port = 18081/);
  assert.match(conf, /trust_bundle_path = "\/tmp\/x\/bundle.pem"/);
  assert.doesNotMatch(conf, /insecure_bootstrap/);
});
