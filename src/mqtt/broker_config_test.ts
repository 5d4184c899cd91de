import assert from "node:assert/strict";
import { join } from "node:path";
import { realRunner } from "../process/mod.ts";
import {
  hashPassword,
  renderAcl,
  renderMosquittoConf,
  verifyPassword,
  writeBrokerFiles,
} from "./broker_config.ts";
import { REMOVED_ROLE } from "./dynsec.ts";
import { parseMosquittoConf } from "./mosquitto_conf.ts";

Deno.test("hashPassword writes mosquitto's $7$ PBKDF2-SHA512 format", () => {
  const h = hashPassword("s3cret");
  const m = /^\$7\$101\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$/.exec(h);
  assert.ok(m, h);
  assert.equal(atob(m[1]).length, 12); // salt
  assert.equal(atob(m[2]).length, 64); // SHA-512 output
  assert.ok(verifyPassword("s3cret", h));
  assert.ok(!verifyPassword("s3cret!", h));
  assert.notEqual(hashPassword("s3cret"), h, "a fresh salt every time");
  // Deterministic with a fixed salt (a known vector computed once with node:crypto).
  const fixed = hashPassword("pw", { salt: new Uint8Array(12), iterations: 1 });
  assert.match(fixed, /^\$7\$1\$AAAAAAAAAAAAAAAA\$/);
});

Deno.test("verifyPassword accepts a hash written by the real mosquitto_passwd", async () => {
  // -U hashes a plaintext file in place: the password never goes on the command line.
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-passwd-" });
  try {
    const file = join(dir, "pw");
    await Deno.writeTextFile(file, "alice:correct horse\n", { mode: 0o600 });
    await realRunner.output("mosquitto_passwd", ["-U", file]);
    const line = (await Deno.readTextFile(file)).trim();
    const [user, hash] = [line.slice(0, line.indexOf(":")), line.slice(line.indexOf(":") + 1)];
    assert.equal(user, "alice");
    assert.match(hash, /^\$7\$/);
    assert.ok(verifyPassword("correct horse", hash));
    assert.ok(!verifyPassword("wrong", hash));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("ACL: robots confined to their own subtree; the server and the admin by name", () => {
  const acl = renderAcl({ server: "k8s4r-server", admin: "k8s4r-admin" });
  const lines = acl.split("\n").filter((l) => l && !l.startsWith("#"));
  assert.deepEqual(lines, [
    "user k8s4r-server",
    "topic readwrite k8s4r/#",
    "user k8s4r-admin",
    "topic readwrite $CONTROL/dynamic-security/#",
    // One pattern per up kind: `up/#` let a robot retain any number of made-up sub-topics.
    "pattern write k8s4r/robots/%u/up/register",
    "pattern write k8s4r/robots/%u/up/heartbeat",
    "pattern write k8s4r/robots/%u/up/status",
    "pattern write k8s4r/robots/%u/up/task",
    "pattern read k8s4r/robots/%u/down/#",
  ]);
  assert.ok(
    !lines.some((l) => l.startsWith("pattern write") && /[#+]/.test(l)),
    "a wildcard in a robot's write pattern",
  );
  assert.match(
    renderAcl({ server: "k8s4r-server", tlsAdminUsers: ["fleet-a"] }),
    /^user fleet-a\ntopic readwrite k8s4r\/#$/m,
  );
  assert.throws(
    () => renderAcl({ server: "bad user\ntopic readwrite #" }),
    /invalid MQTT username/,
  );
});

Deno.test("mosquitto.conf: global auth (no per_listener_settings), one TLS listener per address", () => {
  const files = {
    aclFile: "/p/acl",
    passwordFile: "/p/passwd",
    dynsecFile: "/p/dynamic-security.json",
    persistenceDir: "/p/data",
    logFile: "/p/log",
  };
  const base = {
    tlsPort: 18883,
    plainPort: 11883,
    cafile: "/ca.pem",
    certfile: "/broker.pem",
    keyfile: "/broker.key",
    server: { username: "k8s4r-server", password: "pw" },
  };
  const conf = renderMosquittoConf({
    ...base,
    tlsBind: ["127.0.0.1", "10.203.7.1"],
    dynsecPlugin: "/usr/lib/dynsec.so",
  }, files);
  const lines = conf.split("\n");
  assert.ok(!/^per_listener_settings/m.test(conf), "2.0.21 loses queued messages with it");
  // Auth settings come before the first listener: global.
  const firstListener = lines.findIndex((l) => l.startsWith("listener "));
  for (
    const l of [
      "allow_anonymous false",
      "password_file /p/passwd",
      "acl_file /p/acl",
      "plugin /usr/lib/dynsec.so",
      "plugin_opt_config_file /p/dynamic-security.json",
    ]
  ) {
    const at = lines.indexOf(l);
    assert.ok(at >= 0 && at < firstListener, `${l} is not global`);
  }
  assert.deepEqual(lines.filter((l) => l.startsWith("listener ")), [
    "listener 18883 127.0.0.1",
    "listener 18883 10.203.7.1",
    "listener 11883 127.0.0.1",
  ]);
  assert.equal(lines.filter((l) => l === "require_certificate true").length, 2);
  assert.equal(lines.filter((l) => l === "use_identity_as_username true").length, 2);
  // The client id is the CN, set in each TLS listener block (globally it has no effect).
  const parsed = parseMosquittoConf(conf);
  const tls = parsed.listeners.filter((l) => l.port === 18883);
  assert.equal(tls.length, 2);
  for (const l of tls) assert.equal(l.options.get("use_username_as_clientid")?.value, "true");
  assert.equal(parsed.global.get("use_username_as_clientid"), undefined);
  const plain = parsed.listeners.find((l) => l.port === 11883)!;
  assert.equal(plain.options.get("use_username_as_clientid"), undefined, "the server keeps its id");
  assert.doesNotMatch(renderMosquittoConf(base, files), /^plugin/m);
  assert.throws(
    () => renderMosquittoConf({ ...base, tlsBind: ["127.0.0.1", "127.0.0.1"] }, files),
    /tlsBind: expected distinct addresses/,
  );
});

Deno.test("writeBrokerFiles: config, 0600 password file, loopback plain listener", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-brokercfg-" });
  try {
    const files = await writeBrokerFiles(join(dir, "m"), {
      tlsPort: 18883,
      plainPort: 11883,
      cafile: "/ca.pem",
      certfile: "/broker.pem",
      keyfile: "/broker.key",
      server: { username: "k8s4r-server", password: "pw-123" },
      admin: { username: "k8s4r-admin", password: "adm-456" },
      dynsecPlugin: "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
      runAsUser: "nobody",
    });
    const conf = await Deno.readTextFile(files.config);
    for (
      const line of [
        "user nobody",
        "persistence true",
        `persistence_location ${files.persistenceDir}/`,
        "autosave_interval 1",
        "max_queued_messages 100000",
        `max_queued_bytes ${128 * 1024 * 1024}`,
        "max_packet_size 266240",
        `log_dest file ${files.logFile}`,
        "listener 18883 127.0.0.1",
        "cafile /ca.pem",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
        `acl_file ${files.aclFile}`,
        "listener 11883 127.0.0.1",
        `password_file ${files.passwordFile}`,
        `plugin_opt_config_file ${files.dynsecFile}`,
      ]
    ) assert.ok(conf.split("\n").includes(line), `missing line: ${line}`);
    // Its PUBACK 0x95 breaks MQTT 5 clients (tests/broker_limits_test.ts): not written.
    assert.ok(!conf.includes("message_size_limit"));
    assert.equal(conf.split("\n").filter((l) => l === "allow_anonymous false").length, 1);
    // The plaintext passwords are nowhere but in the caller's memory.
    assert.ok(!conf.includes("pw-123") && !conf.includes("adm-456"));
    const pw = (await Deno.readTextFile(files.passwordFile)).trim().split("\n");
    assert.ok(!pw.join("").includes("pw-123") && !pw.join("").includes("adm-456"));
    assert.ok(verifyPassword("pw-123", pw[0].slice("k8s4r-server:".length)));
    assert.ok(verifyPassword("adm-456", pw[1].slice("k8s4r-admin:".length)));
    assert.equal((await Deno.stat(files.passwordFile)).mode! & 0o777, 0o600);
    // The plugin's state is created once, then kept (it holds the removed robots).
    const dyn = JSON.parse(await Deno.readTextFile(files.dynsecFile));
    assert.equal(dyn.roles[0].rolename, REMOVED_ROLE);
    assert.ok(dyn.roles[0].acls.every((a: { allow: boolean }) => a.allow === false));
    dyn.clients.push({ username: "robot-009", roles: [{ rolename: REMOVED_ROLE }] });
    await Deno.writeTextFile(files.dynsecFile, JSON.stringify(dyn));
    await writeBrokerFiles(join(dir, "m"), {
      tlsPort: 18883,
      plainPort: 11883,
      cafile: "/ca.pem",
      certfile: "/broker.pem",
      keyfile: "/broker.key",
      server: { username: "k8s4r-server", password: "pw-123" },
      dynsecPlugin: "/x.so",
    });
    assert.equal(
      JSON.parse(await Deno.readTextFile(files.dynsecFile)).clients[0].username,
      "robot-009",
    );
    await assert.rejects(
      () =>
        writeBrokerFiles(join(dir, "m2"), {
          tlsPort: 70000,
          plainPort: 1,
          cafile: "/ca",
          certfile: "/c",
          keyfile: "/k",
          server: { username: "u", password: "p" },
        }),
      /tlsPort: expected a port in \[1, 65535\], got 70000/,
    );
    // 0 would mean "no limit" to mosquitto: refused.
    await assert.rejects(
      () =>
        writeBrokerFiles(join(dir, "m3"), {
          tlsPort: 1,
          plainPort: 2,
          cafile: "/ca",
          certfile: "/c",
          keyfile: "/k",
          server: { username: "u", password: "p" },
          maxQueuedBytes: 0,
        }),
      /maxQueuedBytes: expected a positive integer, got 0/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
