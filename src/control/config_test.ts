import assert from "node:assert/strict";
import { parseControlConfig, readAdminCredentials, renderControlConfig } from "./config.ts";

const GOOD = {
  trustDomain: "k8s4r.example.org",
  spireServer: { adminSocket: "spire/api.sock", address: "10.0.0.1:8081" },
  broker: {
    url: "ssl://10.0.0.1:8883",
    adminAddress: "127.0.0.1:1883",
    adminCredentials: "/etc/k8s4r/broker-admin.json",
  },
  robotSelectors: ["unix:uid:0"],
  factoryCa: { cert: "ca.crt", key: "/k/ca.key" },
  records: "robots.json",
};

Deno.test("control-host config: renders and reads back; relative paths resolve next to the file", () => {
  const c = parseControlConfig(renderControlConfig(GOOD), "/etc/k8s4r/control-host.json");
  assert.equal(c.spireServer.adminSocket, "/etc/k8s4r/spire/api.sock");
  assert.equal(c.spireServer.address, "10.0.0.1:8081");
  assert.equal(c.broker.adminCredentials, "/etc/k8s4r/broker-admin.json");
  assert.deepEqual(c.factoryCa, { cert: "/etc/k8s4r/ca.crt", key: "/k/ca.key" });
  assert.equal(c.records, "/etc/k8s4r/robots.json");
  const noCa = parseControlConfig(
    renderControlConfig({ ...GOOD, factoryCa: undefined }),
    "/x.json",
  );
  assert.equal(noCa.factoryCa, undefined);
  assert.equal(c.spireServer.defaultX509SvidTtl, undefined, "SPIRE's default (1h) applies");
  const ttl = parseControlConfig(
    renderControlConfig({
      ...GOOD,
      spireServer: { ...GOOD.spireServer, defaultX509SvidTtl: "4h" },
    }),
    "/x.json",
  );
  assert.equal(ttl.spireServer.defaultX509SvidTtl, "4h");
});

Deno.test("control-host config: bad input is one line naming file, line, key and what was expected", () => {
  const bad = (edit: (o: Record<string, unknown>) => void) => {
    const o = JSON.parse(renderControlConfig(GOOD));
    edit(o);
    return () => parseControlConfig(JSON.stringify(o, null, 2), "/etc/k8s4r/control-host.json");
  };
  assert.throws(
    bad((o) => ((o.broker as Record<string, unknown>).url = "mqtt://10.0.0.1:1883")),
    /^ControlConfigError: \/etc\/k8s4r\/control-host\.json:\d+: broker\.url: mqtt:\/\/ is refused/,
  );
  assert.throws(
    bad((o) => ((o.spireServer as Record<string, unknown>).address = "10.0.0.1")),
    /control-host\.json:\d+: spireServer\.address: expected host:port like 10\.0\.0\.1:8081/,
  );
  assert.throws(
    bad((o) => (o.robotSelectors = [])),
    /robotSelectors: expected a non-empty list of selectors/,
  );
  assert.throws(bad((o) => (o.extra = 1)), /control-host\.json:\d+: extra: unknown key/);
  assert.throws(
    bad((o) => ((o.spireServer as Record<string, unknown>).defaultX509SvidTtl = "an hour")),
    /control-host\.json:\d+: spireServer\.defaultX509SvidTtl: expected a duration like 600, 10m/,
  );
  assert.throws(bad((o) => (o.version = 2)), /version: expected 1, got 2/);
  assert.throws(
    () => parseControlConfig('{\n  "format": ', "/c.json"),
    /^ControlConfigError: \/c\.json(:\d+)?: invalid JSON/,
  );
  try {
    bad((o) => delete o.records)();
    assert.fail("no error");
  } catch (err) {
    assert.equal((err as { exitCode?: number }).exitCode, 2);
    assert.match((err as Error).message, /records: expected the file robot add keeps/);
  }
});

Deno.test("broker admin credentials: a file others can read is refused", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const f = `${dir}/admin.json`;
    await Deno.writeTextFile(f, JSON.stringify({ username: "k8s4r-admin", password: "pw" }), {
      mode: 0o644,
    });
    await Deno.chmod(f, 0o644);
    await assert.rejects(() => readAdminCredentials(f), /readable by others; expected mode 0600/);
    await Deno.chmod(f, 0o600);
    assert.deepEqual(await readAdminCredentials(f), { username: "k8s4r-admin", password: "pw" });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
