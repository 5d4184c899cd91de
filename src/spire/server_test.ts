import assert from "node:assert/strict";
import { RecordingRunner } from "../process/mod.ts";
import {
  DEFAULT_SERVER_CONFIG,
  entryMatches,
  parseEntryJson,
  planSpireServer,
  readConfigBool,
  readConfigValue,
  renderServerConfig,
  SpireServerCli,
} from "./server.ts";

// Captured from the real spire-server v1.13.3 (`-output json`); the token value is redacted.
const TOKEN_JSON = `{"expires_at":"1796031958","value":"REDACTED-TOKEN-VALUE"}\n`;
const ENTRY = (id: string, uid: number, dns: string[], ttl: number) => ({
  admin: false,
  created_at: "1796031358",
  dns_names: dns,
  downstream: false,
  expires_at: "0",
  federates_with: [],
  hint: "",
  id,
  jwt_svid_ttl: 0,
  parent_id: { path: "/k8s4r/node/robot-001", trust_domain: "k8s4r.example.org" },
  revision_number: "0",
  selectors: [{ type: "unix", value: `uid:${uid}` }],
  spiffe_id: { path: "/robot/robot-001", trust_domain: "k8s4r.example.org" },
  store_svid: false,
  x509_svid_ttl: ttl,
});
const OK = { code: 0, message: "OK" };
const SIMILAR_EXISTS = `{"results":[{"entry":${
  JSON.stringify(ENTRY("", 0, ["robot-001"], 600))
},"status":{"code":6,"message":"similar entry already exists"}}]}`;

const ROBOT = "spiffe://k8s4r.example.org/robot/robot-001";
const NODE = "spiffe://k8s4r.example.org/k8s4r/node/robot-001";
const SOCK = "/p/.spire-data/server/api.sock";
const BIN = "/bin/spire-server";

Deno.test("committed config/spire/server.conf is renderServerConfig() of the guide's values", async () => {
  const committed = await Deno.readTextFile(
    new URL("../../config/spire/server.conf", import.meta.url),
  );
  assert.equal(committed, renderServerConfig());
  assert.equal(readConfigValue(committed, "trust_domain"), "k8s4r.example.org");
  assert.equal(readConfigValue(committed, "bind_port"), "8081");
  assert.equal(readConfigValue(committed, "socket_path"), "./.spire-data/server/api.sock");
  assert.match(committed, /NodeAttestor "join_token"/);
  assert.match(committed, /KeyManager "disk"/);
  assert.match(committed, /connection_string = "\.\/\.spire-data\/server\/datastore\.sqlite3"/);
  assert.equal(DEFAULT_SERVER_CONFIG.bindAddress, "127.0.0.1");
});

Deno.test("planSpireServer: flags for overrides that have one, rendered config otherwise", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    await Deno.mkdir(`${dir}/config/spire`, { recursive: true });
    await Deno.writeTextFile(`${dir}/config/spire/server.conf`, renderServerConfig());
    const plain = await planSpireServer({
      bin: BIN,
      configFile: "config/spire/server.conf",
      cwd: dir,
      logFile: `${dir}/log`,
      port: 18081,
    });
    assert.deepEqual(plain.args, [
      "run",
      "-config",
      `${dir}/config/spire/server.conf`,
      "-serverPort",
      "18081",
      "-socketPath",
      `${dir}/.spire-data/server/api.sock`,
    ]);
    assert.equal(plain.rendered, undefined);

    const custom = await planSpireServer({
      bin: BIN,
      configFile: "config/spire/server.conf",
      cwd: dir,
      logFile: `${dir}/log`,
      dataDir: "d",
      defaultX509SvidTtl: "2m",
      bindAddress: "127.0.0.1",
    });
    assert.equal(custom.configFile, `${dir}/d/server.generated.conf`);
    assert.ok(custom.rendered);
    assert.equal(readConfigValue(custom.rendered, "default_x509_svid_ttl"), "2m");
    assert.equal(readConfigValue(custom.rendered, "ca_ttl"), "24h");
    assert.equal(readConfigValue(custom.rendered, "data_dir"), `${dir}/d`);
    assert.equal(readConfigValue(custom.rendered, "bind_port"), "8081");
    assert.match(custom.rendered, new RegExp(`"${dir}/d/datastore.sqlite3"`));

    await assert.rejects(
      planSpireServer({ bin: BIN, configFile: "nope.conf", cwd: dir, logFile: "l" }),
      /nope\.conf: cannot read the SPIRE server config/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("generateJoinToken: argv, parsed value and expiry; the token is never echoed", async () => {
  const runner = new RecordingRunner(() => ({ stdout: TOKEN_JSON }));
  const cli = new SpireServerCli(runner, BIN, SOCK);
  const t = await cli.generateJoinToken(NODE, 600);
  assert.equal(t.value, "REDACTED-TOKEN-VALUE");
  assert.equal(t.expiresAt.getTime(), 1796031958 * 1000);
  assert.deepEqual(runner.calls[0].args, [
    "token",
    "generate",
    "-spiffeID",
    NODE,
    "-ttl",
    "600",
    "-output",
    "json",
    "-socketPath",
    SOCK,
  ]);
  // Garbage output: the error must not contain it (it could be the secret).
  const bad = new SpireServerCli(
    new RecordingRunner(() => ({ stdout: "SECRET-ISH garbage" })),
    BIN,
    SOCK,
  );
  await assert.rejects(bad.generateJoinToken(NODE), (err: Error) => {
    assert.doesNotMatch(err.message, /SECRET-ISH/);
    assert.match(err.message, /token generate: unexpected output/);
    return true;
  });
});

Deno.test("listEntries parses SPIRE's protojson", async () => {
  const runner = new RecordingRunner(() => ({
    stdout: JSON.stringify({ entries: [ENTRY("e1", 0, ["robot-001"], 600)], next_page_token: "" }),
  }));
  const cli = new SpireServerCli(runner, BIN, SOCK);
  const entries = await cli.listEntries({ spiffeId: ROBOT });
  assert.deepEqual(entries, [{
    id: "e1",
    spiffeId: ROBOT,
    parentId: NODE,
    selectors: ["unix:uid:0"],
    dnsNames: ["robot-001"],
    x509SvidTtl: 600,
    hint: "",
  }]);
  assert.deepEqual(runner.calls[0].args, [
    "entry",
    "show",
    "-output",
    "json",
    "-spiffeID",
    ROBOT,
    "-socketPath",
    SOCK,
  ]);
  assert.deepEqual(parseEntryJson({}).spiffeId, "");
});

Deno.test("createEntry reports a per-entry failure although spire-server exits 0", async () => {
  const cli = new SpireServerCli(
    new RecordingRunner(() => ({ stdout: SIMILAR_EXISTS })),
    BIN,
    SOCK,
  );
  await assert.rejects(
    cli.createEntry({ spiffeId: ROBOT, parentId: NODE, selectors: ["unix:uid:0"], dnsNames: [] }),
    /entry create failed: similar entry already exists/,
  );
});

/** A fake spire-server holding entries in memory, answering like v1.13.3 does. */
function fakeServer(initial: ReturnType<typeof ENTRY>[]) {
  const entries = [...initial];
  let n = 0;
  const runner = new RecordingRunner((_cmd, args) => {
    const flag = (f: string) => {
      const i = args.indexOf(f);
      return i >= 0 ? args[i + 1] : undefined;
    };
    const all = (f: string) => args.flatMap((a, i) => (a === f ? [args[i + 1]] : []));
    const build = (id: string) => ({
      ...ENTRY(id, 0, all("-dns"), Number(flag("-x509SVIDTTL") ?? 0)),
      selectors: all("-selector").map((s) => {
        const [type, ...rest] = s.split(":");
        return { type, value: rest.join(":") };
      }),
    });
    const sub = `${args[0]} ${args[1]}`;
    if (sub === "entry show") return { stdout: JSON.stringify({ entries, next_page_token: "" }) };
    if (sub === "entry create") {
      const e = build(`new-${++n}`);
      entries.push(e);
      return { stdout: JSON.stringify({ results: [{ entry: e, status: OK }] }) };
    }
    if (sub === "entry update") {
      const id = flag("-entryID")!;
      const i = entries.findIndex((e) => e.id === id);
      entries[i] = build(id);
      return { stdout: JSON.stringify({ results: [{ entry: entries[i], status: OK }] }) };
    }
    if (sub === "entry delete") {
      const id = flag("-entryID")!;
      entries.splice(entries.findIndex((e) => e.id === id), 1);
      return { stdout: JSON.stringify({ results: [{ id, status: OK }] }) };
    }
    return new Error(`unexpected ${sub}`);
  });
  return { runner, entries, cli: new SpireServerCli(runner, BIN, SOCK) };
}

Deno.test("reconcileEntry creates once, then is unchanged, then updates in place", async () => {
  const { runner, entries, cli } = fakeServer([]);
  const desired = {
    spiffeId: ROBOT,
    parentId: NODE,
    selectors: ["unix:uid:1000"],
    dnsNames: ["robot-001"],
    x509SvidTtl: 300,
  };
  assert.equal(await cli.reconcileEntry(desired), "created");
  assert.deepEqual(runner.calls[1].args, [
    "entry",
    "create",
    "-parentID",
    NODE,
    "-spiffeID",
    ROBOT,
    "-selector",
    "unix:uid:1000",
    "-dns",
    "robot-001",
    "-x509SVIDTTL",
    "300",
    "-output",
    "json",
    "-socketPath",
    SOCK,
  ]);
  assert.equal(await cli.reconcileEntry(desired), "unchanged");
  assert.equal(entries.length, 1);
  assert.equal(await cli.reconcileEntry({ ...desired, dnsNames: ["robot-001", "x"] }), "updated");
  assert.equal(entries.length, 1);
  assert.deepEqual(entries[0].dns_names, ["robot-001", "x"]);
  assert.equal(entries[0].x509_svid_ttl, 300);
  // No TTL asked: the existing one is kept, and a TTL difference alone is no change.
  assert.equal(
    await cli.reconcileEntry({ ...desired, dnsNames: ["robot-001"], x509SvidTtl: undefined }),
    "updated",
  );
  assert.equal(entries[0].x509_svid_ttl, 300);
  assert.equal(
    await cli.reconcileEntry({ ...desired, x509SvidTtl: undefined }),
    "unchanged",
  );
});

Deno.test("reconcileEntry deletes duplicates, keeping the one that already matches", async () => {
  const { entries, cli } = fakeServer([
    ENTRY("a", 1, [], 0),
    ENTRY("b", 0, ["robot-001"], 600),
    ENTRY("c", 2, [], 0),
  ]);
  const r = await cli.reconcileEntry({
    spiffeId: ROBOT,
    parentId: NODE,
    selectors: ["unix:uid:0"],
    dnsNames: ["robot-001"],
    x509SvidTtl: 600,
  });
  assert.equal(r, "updated");
  assert.deepEqual(entries.map((e) => e.id), ["b"]);
});

Deno.test("entryMatches: selectors are a set, DNS names an ordered list", () => {
  const e = {
    id: "x",
    spiffeId: ROBOT,
    parentId: NODE,
    selectors: ["unix:uid:0", "unix:gid:0"],
    dnsNames: ["a", "b"],
    x509SvidTtl: 0,
    hint: "",
  };
  const d = {
    spiffeId: ROBOT,
    parentId: NODE,
    selectors: ["unix:gid:0", "unix:uid:0"],
    dnsNames: ["a", "b"],
  };
  assert.ok(entryMatches(e, d));
  assert.ok(!entryMatches(e, { ...d, dnsNames: ["b", "a"] }));
  assert.ok(!entryMatches(e, { ...d, x509SvidTtl: 60 }));
});

Deno.test("bundlePem and mintX509 argv", async () => {
  const runner = new RecordingRunner((_c, args) => {
    if (args[0] === "bundle") return { stdout: "-----BEGIN CERTIFICATE-----\nx\n" };
    if (args[0] === "x509") {
      const dir = args[args.indexOf("-write") + 1];
      const st = Deno.statSync(dir);
      assert.equal((st.mode ?? 0) & 0o777, 0o700);
      Deno.writeTextFileSync(`${dir}/svid.pem`, "CERT");
      Deno.writeTextFileSync(`${dir}/key.pem`, "KEY");
      Deno.writeTextFileSync(`${dir}/bundle.pem`, "BUNDLE");
      return {};
    }
    return new Error("unexpected");
  });
  const cli = new SpireServerCli(runner, BIN, SOCK);
  assert.match(await cli.bundlePem(), /BEGIN CERTIFICATE/);
  assert.deepEqual(runner.calls[0].args, ["bundle", "show", "-format", "pem", "-socketPath", SOCK]);
  const m = await cli.mintX509({
    spiffeId: "spiffe://k8s4r.example.org/mqtt-broker",
    dnsNames: ["localhost"],
    ttlSeconds: 600,
  });
  assert.deepEqual(m, { certPem: "CERT", keyPem: "KEY", bundlePem: "BUNDLE" });
  const args = runner.calls[1].args;
  const dir = args[args.indexOf("-write") + 1];
  assert.deepEqual(args, [
    "x509",
    "mint",
    "-spiffeID",
    "spiffe://k8s4r.example.org/mqtt-broker",
    "-dns",
    "localhost",
    "-ttl",
    "600s",
    "-write",
    dir,
    "-socketPath",
    SOCK,
  ]);
  await assert.rejects(Deno.stat(dir), Deno.errors.NotFound); // removed afterwards
});

Deno.test("readConfigValue reads the server block through the HCL parser, not the first matching line", async () => {
  // SPIRE's health_checks block has its own bind_port/bind_address; comments may hold old values.
  const text = `/* old:
  socket_path = "/old/api.sock"
*/
health_checks {
  listener_enabled = true
  bind_address = "0.0.0.0"
  bind_port = "8080"
}
${renderServerConfig()}`;
  assert.equal(readConfigValue(text, "bind_port"), "8081");
  assert.equal(readConfigValue(text, "bind_address"), "127.0.0.1");
  assert.equal(readConfigValue(text, "socket_path"), "./.spire-data/server/api.sock");
  // A broken config is an error with its line, never a silent default.
  assert.throws(
    () => readConfigValue("server {\n  bind_port = \n}\n", "bind_port"),
    /line 2: expected a value, got end of line/,
  );
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    await Deno.writeTextFile(`${dir}/server.conf`, 'server {\n  socket_path = "./s.sock"\n');
    await assert.rejects(
      planSpireServer({ bin: BIN, configFile: "server.conf", cwd: dir, logFile: "l" }),
      new RegExp(`${dir}/server.conf:1: unclosed '\\{'`),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("reconcileEntries: one entry show for all, then only the writes that are needed", async () => {
  const { runner, entries, cli } = fakeServer([ENTRY("b", 0, ["robot-001"], 600)]);
  const other = "spiffe://k8s4r.example.org/mqtt-broker";
  const r = await cli.reconcileEntries([
    {
      spiffeId: ROBOT,
      parentId: NODE,
      selectors: ["unix:uid:0"],
      dnsNames: ["robot-001"],
      x509SvidTtl: 600,
    },
    { spiffeId: other, parentId: NODE, selectors: ["unix:uid:0"], dnsNames: ["localhost"] },
  ]);
  assert.deepEqual(r, ["unchanged", "created"]);
  assert.deepEqual(runner.calls.map((c) => `${c.args[0]} ${c.args[1]}`), [
    "entry show",
    "entry create",
  ]);
  // Unfiltered: every entry of the server, matched here.
  assert.deepEqual(runner.calls[0].args, ["entry", "show", "-output", "json", "-socketPath", SOCK]);
  assert.equal(entries.length, 2);
  assert.deepEqual(await cli.reconcileEntries([]), []);
  assert.equal(runner.calls.length, 2);
});

Deno.test("cache_reload_interval: rendered only when asked, and kept from the config file", async () => {
  assert.doesNotMatch(renderServerConfig(), /experimental|cache_reload_interval/);
  const hcl = renderServerConfig({ cacheReloadInterval: "500ms" });
  assert.ok(hcl.includes('\n  experimental {\n    cache_reload_interval = "500ms"\n  }\n}\n'));
  assert.equal(readConfigValue(hcl, "experimental.cache_reload_interval"), "500ms");
  const events = renderServerConfig({ cacheReloadInterval: "100ms", eventsBasedCache: true });
  assert.ok(
    events.includes(
      '  experimental {\n    cache_reload_interval = "100ms"\n    events_based_cache = true\n  }',
    ),
  );
  assert.equal(readConfigBool(events, "experimental.events_based_cache"), true);
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    await Deno.writeTextFile(`${dir}/server.conf`, hcl);
    const plan = await planSpireServer({
      bin: BIN,
      configFile: "server.conf",
      cwd: dir,
      logFile: `${dir}/log`,
      dataDir: "d",
    });
    assert.equal(readConfigValue(plan.rendered!, "experimental.cache_reload_interval"), "500ms");
    const asked = await planSpireServer({
      bin: BIN,
      configFile: "server.conf",
      cwd: dir,
      logFile: `${dir}/log`,
      cacheReloadInterval: "200ms",
    });
    assert.equal(readConfigValue(asked.rendered!, "experimental.cache_reload_interval"), "200ms");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("ratelimit.attestation: rendered only when set, and kept from the config file", async () => {
  assert.doesNotMatch(renderServerConfig(), /ratelimit/);
  const hcl = renderServerConfig({ attestationRateLimit: false });
  assert.ok(hcl.includes("\n  ratelimit {\n    attestation = false\n  }\n"));
  assert.equal(readConfigBool(hcl, "ratelimit.attestation"), false);
  assert.equal(readConfigBool(renderServerConfig(), "ratelimit.attestation"), undefined);
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    await Deno.writeTextFile(`${dir}/server.conf`, hcl);
    const plan = await planSpireServer({
      bin: BIN,
      configFile: "server.conf",
      cwd: dir,
      logFile: `${dir}/log`,
      dataDir: "d",
    });
    assert.equal(readConfigBool(plan.rendered!, "ratelimit.attestation"), false);
    const on = await planSpireServer({
      bin: BIN,
      configFile: "server.conf",
      cwd: dir,
      logFile: `${dir}/log`,
      attestationRateLimit: true,
    });
    assert.equal(readConfigBool(on.rendered!, "ratelimit.attestation"), true);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("postgres datastore, UpstreamAuthority disk, agent_ttl, health_checks: rendered when asked", async () => {
  const plain = renderServerConfig();
  assert.doesNotMatch(plain, /UpstreamAuthority|health_checks|agent_ttl|postgres/);
  const hcl = renderServerConfig({
    dataDir: "/d",
    datastore: { type: "postgres", connectionString: "host='127.0.0.1' password='s3cret'" },
    upstreamAuthority: {
      certFile: "/ca/up.crt",
      keyFile: "/ca/up.key",
      bundleFile: "/ca/root.crt",
    },
    agentTtl: "30s",
    healthChecks: { bindAddress: "127.0.0.1", port: 8099 },
  });
  assert.ok(hcl.includes('database_type = "postgres"'), hcl);
  assert.ok(hcl.includes(`connection_string = "host='127.0.0.1' password='s3cret'"`), hcl);
  assert.ok(hcl.includes('\n  agent_ttl = "30s"\n'), hcl);
  assert.ok(
    hcl.includes(
      '  UpstreamAuthority "disk" {\n    plugin_data {\n      cert_file_path = "/ca/up.crt"\n' +
        '      key_file_path = "/ca/up.key"\n      bundle_file_path = "/ca/root.crt"\n',
    ),
    hcl,
  );
  assert.ok(
    hcl.includes(
      'health_checks {\n  listener_enabled = true\n  bind_address = "127.0.0.1"\n  bind_port = "8099"',
    ),
    hcl,
  );
  assert.equal(readConfigValue(hcl, "agent_ttl"), "30s");
  // A rendered config that holds a password is 0600, also when the file existed before.
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    await Deno.writeTextFile(`${dir}/server.conf`, plain);
    const plan = await planSpireServer({
      bin: BIN,
      configFile: "server.conf",
      cwd: dir,
      logFile: `${dir}/log`,
      datastore: { type: "postgres", connectionString: "x" },
    });
    assert.equal(plan.configFile, `${dir}/.spire-data/server/server.generated.conf`);
    assert.match(plan.rendered!, /database_type = "postgres"/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("x509pop NodeAttestor: rendered next to join_token only when a factory CA is given", async () => {
  const text = renderServerConfig({ x509popCaBundlePath: "/dev-env/factory-ca/ca.crt" });
  assert.match(
    text,
    /NodeAttestor "join_token" \{\n {4}plugin_data \{\}\n {2}\}\n\n {2}NodeAttestor "x509pop" \{\n {4}plugin_data \{\n {6}ca_bundle_path = "\/dev-env\/factory-ca\/ca\.crt"\n/,
  );
  assert.doesNotMatch(renderServerConfig(), /x509pop/);
  // planSpireServer renders a config for it (SPIRE has no flag), with the bind address flag.
  const dir = await Deno.makeTempDir();
  try {
    await Deno.mkdir(`${dir}/config/spire`, { recursive: true });
    await Deno.writeTextFile(`${dir}/config/spire/server.conf`, renderServerConfig());
    const plan = await planSpireServer({
      bin: BIN,
      configFile: "config/spire/server.conf",
      cwd: dir,
      logFile: `${dir}/log`,
      bindAddress: "10.203.5.1",
      x509popCaBundle: `${dir}/ca.crt`,
    });
    assert.match(plan.rendered!, new RegExp(`ca_bundle_path = "${dir}/ca\\.crt"`));
    assert.match(plan.rendered!, /bind_address = "10\.203\.5\.1"/);
    assert.deepEqual(
      plan.args.slice(plan.args.indexOf("-bindAddress"), plan.args.indexOf("-bindAddress") + 2),
      ["-bindAddress", "10.203.5.1"],
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("listAgents, evictAgent and ban: argv, parsing, a missing agent is not an error", async () => {
  const agents = {
    agents: [{
      attestation_type: "x509pop",
      banned: false,
      can_reattest: true,
      id: { path: "/spire/agent/x509pop/ab", trust_domain: "k8s4r.example.org" },
      selectors: [{ type: "x509pop", value: "subject:cn:robot-008" }],
      x509svid_expires_at: "1796120488",
    }],
  };
  const runner = new RecordingRunner((_cmd, args) => {
    if (args[1] === "list") return { stdout: JSON.stringify(agents) };
    if (args.includes("spiffe://k8s4r.example.org/spire/agent/gone")) {
      return { code: 1, stderr: "Error: rpc error: code = NotFound desc = agent not found\n" };
    }
    return { code: 0, stdout: "" };
  });
  const cli = new SpireServerCli(runner, BIN, SOCK);
  const [a] = await cli.listAgents();
  assert.deepEqual(a, {
    id: "spiffe://k8s4r.example.org/spire/agent/x509pop/ab",
    attestationType: "x509pop",
    banned: false,
    canReattest: true,
    selectors: ["x509pop:subject:cn:robot-008"],
    expiresAt: new Date(1796120488_000),
  });
  assert.equal(await cli.evictAgent(a.id, true), "done");
  assert.deepEqual(runner.calls[1].args.slice(0, 4), ["agent", "ban", "-spiffeID", a.id]);
  assert.equal(await cli.evictAgent("spiffe://k8s4r.example.org/spire/agent/gone"), "not found");
  assert.equal(runner.calls[2].args[1], "evict");
});
