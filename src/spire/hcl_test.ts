import assert from "node:assert/strict";
import { renderAgentConfig } from "./agent.ts";
import { attrString, block, type HclBody, parseHcl } from "./hcl.ts";
import { renderServerConfig } from "./server.ts";

Deno.test("hcl: blocks, labels, lists, comments, line numbers", () => {
  const b = parseHcl(
    `# c\nserver {\n  a = "x" // c\n  n = 3\n  l = ["p", "q"]\n}\n/* x\n */\nplugins { NodeAttestor "join_token" { plugin_data {} } }\n`,
  );
  assert.equal(b.blocks[0].type, "server");
  assert.deepEqual(b.blocks[0].attrs.get("l"), { value: ["p", "q"], line: 5 });
  assert.equal(b.blocks[1].blocks[0].labels[0], "join_token");
  assert.throws(() => parseHcl("server {\n a = 1\n"), /line 1: unclosed '\{'/);
});

const attrs = (b: HclBody | undefined) =>
  Object.fromEntries([...b!.attrs].map(([k]) => [k, attrString(b!, k)?.value]));

Deno.test("hcl: reads back what renderServerConfig writes, escapes included", () => {
  const root = parseHcl(
    renderServerConfig({ trustDomain: "td.example", dataDir: '/d "q"\\x', port: 18081 }),
  );
  assert.deepEqual(attrs(block(root, "server")), {
    bind_address: "127.0.0.1",
    bind_port: "18081",
    socket_path: "./.spire-data/server/api.sock",
    trust_domain: "td.example",
    data_dir: '/d "q"\\x',
    log_level: "INFO",
    default_x509_svid_ttl: "1h",
    ca_ttl: "24h",
  });
  const plugins = block(root, "plugins")!;
  assert.deepEqual(plugins.blocks.map((b) => `${b.type} ${b.labels.join(",")}`), [
    "DataStore sql",
    "NodeAttestor join_token",
    "KeyManager disk",
  ]);
  const ds = block(block(plugins, "DataStore")!, "plugin_data")!;
  assert.equal(attrString(ds, "connection_string")?.value, '/d "q"\\x/datastore.sqlite3');
});

Deno.test("hcl: reads back what renderAgentConfig writes", () => {
  const root = parseHcl(renderAgentConfig({
    trustDomain: "k8s4r.example.org",
    serverAddress: "127.0.0.1",
    serverPort: 8081,
    socketPath: "/tmp/spire-agent/agent.sock",
    dataDir: "/p/.spire-data/agent",
    trustBundlePath: "/p/config/mosquitto/certs/spire-ca.crt",
    logLevel: "DEBUG",
  }));
  const agent = attrs(block(root, "agent"));
  assert.equal(agent.server_port, "8081");
  assert.equal(agent.socket_path, "/tmp/spire-agent/agent.sock");
  assert.equal(agent.trust_bundle_path, "/p/config/mosquitto/certs/spire-ca.crt");
  assert.ok(block(block(root, "plugins")!, "WorkloadAttestor", "unix"));
});
