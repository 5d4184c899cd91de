import assert from "node:assert/strict";
import { agentConfigFromText } from "../../agent/config.ts";
import { fakeContext, ROOT } from "../testing.ts";
import { configChecks } from "./config.ts";

const byId = (id: string) => configChecks.find((c) => c.id === id)!;
const SERVER_CONF = `server {
  bind_port = "8081"
  socket_path = "./.spire-data/server/api.sock"
  trust_domain = "k8s4r.example.org" # comment
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
    }
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
}
`;
const PLUGINS = `spire:
  socketPath: "/tmp/spire-agent/agent.sock"
  trustDomain: "k8s4r.example.org"
  joinToken: "\${SPIRE_JOIN_TOKEN:-}"
  trustBundlePath: "./config/mosquitto/certs/spire-ca.crt"
mqtt:
  brokerSpiffeId: "spiffe://k8s4r.example.org/mqtt-broker"
`;
const MOSQ = `log_dest file ${ROOT}/.dev-env/mosquitto/mosquitto.log
allow_anonymous false
password_file /x/passwd
acl_file /x/acl
plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so
plugin_opt_config_file /x/dynamic-security.json
listener 1883 127.0.0.1
listener 8883 127.0.0.1
cafile ${ROOT}/config/mosquitto/certs/spire-ca.crt
certfile ${ROOT}/.dev-env/mosquitto/broker.crt
keyfile ${ROOT}/.dev-env/mosquitto/broker.key
require_certificate true
use_identity_as_username true
use_username_as_clientid true
`;
const files = (over: Record<string, string> = {}) => ({
  [`${ROOT}/config/spire/server.conf`]: SERVER_CONF,
  [`${ROOT}/config/agent/plugins.yaml`]: PLUGINS,
  [`${ROOT}/.dev-env/mosquitto/mosquitto.conf`]: MOSQ,
  ...over,
});

Deno.test("config.spire-server: dev config is ✓ with hardening notes as info; --production warns", async () => {
  const r = await byId("config.spire-server").run(fakeContext({ files: files() }));
  assert.equal(r.status, "ok");
  assert.match(r.detail, /dev settings: 2 hardening notes/);
  assert.ok(r.info!.some((l) => l.includes('NodeAttestor "join_token"')));
  const p = await byId("config.spire-server").run(
    fakeContext({ files: files(), options: { production: true } }),
  );
  assert.equal(p.status, "warn");
});

Deno.test("config.spire-server: a syntax error names file and line", async () => {
  const r = await byId("config.spire-server").run(
    fakeContext({
      files: files({
        [`${ROOT}/config/spire/server.conf`]: 'server {\n  trust_domain = "x"\n  bind_port = \n}\n',
      }),
    }),
  );
  assert.equal(r.status, "fail");
  assert.equal(r.detail, "config/spire/server.conf:3: expected a value, got end of line");
});

Deno.test("config.agent-plugins: parses; a literal join token warns without echoing it", async () => {
  assert.equal(
    (await byId("config.agent-plugins").run(fakeContext({ files: files() }))).status,
    "ok",
  );
  const leaked = PLUGINS.replace('"${SPIRE_JOIN_TOKEN:-}"', '"abc-secret-123"');
  const r = await byId("config.agent-plugins").run(
    fakeContext({ files: files({ [`${ROOT}/config/agent/plugins.yaml`]: leaked }) }),
  );
  assert.equal(r.status, "warn");
  assert.equal(r.detail, "config/agent/plugins.yaml:4: spire.joinToken holds a literal token");
  assert.ok(!JSON.stringify(r).includes("abc-secret-123"));
});

Deno.test("config.agent-plugins: bad YAML fails with a line", async () => {
  const r = await byId("config.agent-plugins").run(
    fakeContext({
      files: files({ [`${ROOT}/config/agent/plugins.yaml`]: "spire:\n  socketPath: [unclosed\n" }),
    }),
  );
  assert.equal(r.status, "fail");
  assert.match(r.detail, /^config\/agent\/plugins\.yaml:\d+: /);
});

Deno.test("config.consistency: agrees on the dev layout; a different trust domain fails", async () => {
  assert.equal(
    (await byId("config.consistency").run(fakeContext({ files: files() }))).status,
    "ok",
  );
  const other = PLUGINS.replace('trustDomain: "k8s4r.example.org"', 'trustDomain: "other.org"');
  const r = await byId("config.consistency").run(
    fakeContext({ files: files({ [`${ROOT}/config/agent/plugins.yaml`]: other }) }),
  );
  assert.equal(r.status, "fail");
  assert.match(
    r.detail,
    /trust domain differs: layout k8s4r\.example\.org, config\/agent\/plugins\.yaml:3 other\.org/,
  );
});

Deno.test("config.consistency: a socket path that disagrees with the layout warns", async () => {
  const other = PLUGINS.replace("/tmp/spire-agent/agent.sock", "/run/agent.sock");
  const r = await byId("config.consistency").run(
    fakeContext({ files: files({ [`${ROOT}/config/agent/plugins.yaml`]: other }) }),
  );
  assert.equal(r.status, "warn");
  assert.match(r.hint!, /spire\.socketPath: "\/tmp\/spire-agent\/agent\.sock"/);
});

Deno.test("config.mosquitto: generated config is ✓; anonymous + public 1883 are hardening notes", async () => {
  assert.equal((await byId("config.mosquitto").run(fakeContext({ files: files() }))).status, "ok");
  const open = MOSQ.replace("listener 1883 127.0.0.1", "listener 1883").replace(
    "allow_anonymous false",
    "allow_anonymous true",
  );
  const ctx = {
    files: files({ [`${ROOT}/.dev-env/mosquitto/mosquitto.conf`]: open }),
    options: { production: true },
  };
  const r = await byId("config.mosquitto").run(fakeContext(ctx));
  assert.equal(r.status, "warn");
  assert.ok(r.info!.some((l) => l.includes("listener 1883 allows anonymous")));
  assert.ok(r.info!.some((l) => l.includes("bound to all interfaces")));
});

Deno.test("config.mosquitto: per_listener_settings and a missing plugin are hardening notes", async () => {
  const old = `per_listener_settings true\n${
    MOSQ.replace(/^plugin.*\n/gm, "").replace("listener 1883 127.0.0.1", "")
  }`;
  const r = await byId("config.mosquitto").run(
    fakeContext({ files: files({ [`${ROOT}/.dev-env/mosquitto/mosquitto.conf`]: old }) }),
  );
  assert.equal(r.status, "ok");
  assert.ok(r.info!.some((l) => /no dynamic-security plugin: k8s4r robot remove cannot/.test(l)));
  assert.ok(
    r.info!.some((l) => /:1: per_listener_settings true: Mosquitto 2\.0\.21 drops/.test(l)),
  );
  const good = await byId("config.mosquitto").run(fakeContext({ files: files() }));
  assert.ok(!(good.info ?? []).some((l) => /plugin|per_listener/.test(l)), String(good.info));
});

Deno.test("config.mosquitto: missing, or 8883 without require_certificate or use_username_as_clientid, fails", async () => {
  const missing = await byId("config.mosquitto").run(fakeContext({ files: {} }));
  assert.equal(missing.status, "fail");
  assert.match(missing.hint!, /k8s4r devenv start/);
  const weak = MOSQ.replace("require_certificate true", "require_certificate false");
  const r = await byId("config.mosquitto").run(
    fakeContext({ files: files({ [`${ROOT}/.dev-env/mosquitto/mosquitto.conf`]: weak }) }),
  );
  assert.equal(r.status, "fail");
  assert.match(r.detail, /listener 8883 does not set require_certificate true/);
  // A certificate could choose any client id (k8s4r-server's) without it; set globally, it
  // does not count (Mosquitto reads it per listener).
  const global = "use_username_as_clientid true\n" +
    MOSQ.replace("use_username_as_clientid true\n", "");
  const takeover = await byId("config.mosquitto").run(
    fakeContext({ files: files({ [`${ROOT}/.dev-env/mosquitto/mosquitto.conf`]: global }) }),
  );
  assert.equal(takeover.status, "fail");
  assert.match(
    takeover.detail,
    /listener 8883 does not set use_username_as_clientid true: any robot certificate can connect with the fleet server's client id/,
  );
});

// --- the doctor judges plugins.yaml with the agent's own loader (src/agent/config.ts) ---------

const PF = `${ROOT}/config/agent/plugins.yaml`;

/** What `k8s4r agent` says about this plugins.yaml (its own pure loader, no I/O). */
function agentVerdict(text: string, env: Record<string, string | undefined> = {}): string {
  try {
    agentConfigFromText(text, {
      cwd: ROOT,
      env,
      flags: { robotId: "robot-001", config: "config/agent/plugins.yaml" },
      display: "config/agent/plugins.yaml",
    });
    return "accepted";
  } catch (err) {
    return (err as Error).message;
  }
}

for (
  const [name, text, expected] of [
    [
      "an unknown key",
      PLUGINS.replace("  joinToken:", "  insecureBootstrap: true\n  joinToken:"),
      "config/agent/plugins.yaml:4: spire.insecureBootstrap: unknown key; expected one of socketPath, trustDomain, serverAddr, joinToken, joinTokenFile, dataDir, logLevel, trustBundlePath, manage, nodeAttestor, x509popKeyPath, x509popCertPath",
    ],
    [
      "an unset ${VAR} without a default",
      PLUGINS.replace('trustDomain: "k8s4r.example.org"', 'trustDomain: "${K8S4R_TD}"'),
      "config/agent/plugins.yaml:3: spire.trustDomain: environment variable K8S4R_TD is not set (use ${K8S4R_TD:-default} for a default)",
    ],
    [
      "a plaintext broker URL",
      PLUGINS.replace("mqtt:\n", 'mqtt:\n  brokerUrl: "mqtt://localhost:1883"\n'),
      'config/agent/plugins.yaml:7: mqtt.brokerUrl: mqtt:// is refused: robots reach the broker only over mTLS; use ssl://, mqtts:// or tls:// (got "mqtt://localhost:1883")',
    ],
    [
      "a log level the agent does not know",
      PLUGINS.replace("spire:\n", 'spire:\n  logLevel: "LOUD"\n'),
      'config/agent/plugins.yaml:2: spire.logLevel: expected one of DEBUG, INFO, WARN, ERROR, got "LOUD"',
    ],
  ] as const
) {
  Deno.test(`config.agent-plugins: ${name} fails with the agent's own error and a hint`, async () => {
    // The agent refuses this file; the doctor must say exactly what the agent says.
    assert.equal(agentVerdict(text), expected);
    const r = await byId("config.agent-plugins").run(fakeContext({ files: files({ [PF]: text }) }));
    assert.equal(r.status, "fail");
    assert.equal(r.detail, expected);
    assert.ok(r.hint && r.hint.length > 0, "no hint");
  });
}

Deno.test("config.agent-plugins: the unset variable's hint says how to set it or default it", async () => {
  const text = PLUGINS.replace('trustDomain: "k8s4r.example.org"', 'trustDomain: "${K8S4R_TD}"');
  const r = await byId("config.agent-plugins").run(fakeContext({ files: files({ [PF]: text }) }));
  assert.match(r.hint!, /K8S4R_TD/);
  assert.match(r.hint!, /\$\{K8S4R_TD:-/);
  // Positive control: with the variable set, the same file passes, and the value is used.
  const set = await byId("config.consistency").run(
    fakeContext({ files: files({ [PF]: text }), env: { K8S4R_TD: "k8s4r.example.org" } }),
  );
  assert.equal(set.status, "ok", set.detail);
});

Deno.test("config.agent-plugins: the committed plugins.yaml passes the agent's loader and the doctor", async () => {
  const committed = await Deno.readTextFile(
    new URL("../../../config/agent/plugins.yaml", import.meta.url),
  );
  assert.equal(agentVerdict(committed), "accepted");
  const r = await byId("config.agent-plugins").run(
    fakeContext({ files: files({ [PF]: committed }) }),
  );
  assert.equal(r.status, "ok", r.detail);
});

Deno.test("config.agent-plugins: a missing file fails as the agent fails (it is started with --config)", async () => {
  const f: Record<string, string> = files();
  delete f[PF];
  const r = await byId("config.agent-plugins").run(fakeContext({ files: f }));
  assert.equal(r.status, "fail");
  assert.equal(r.detail, "config/agent/plugins.yaml: file not found");
  assert.match(r.hint!, /git checkout -- config\/agent\/plugins\.yaml/);
});
