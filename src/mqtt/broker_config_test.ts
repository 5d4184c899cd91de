import assert from "node:assert/strict";
import { join } from "node:path";
import { realRunner } from "../process/mod.ts";
import {
  hashPassword,
  renderPlainAcl,
  renderTlsAcl,
  verifyPassword,
  writeBrokerFiles,
} from "./broker_config.ts";

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

Deno.test("ACLs confine each robot to its own subtree", () => {
  const acl = renderTlsAcl();
  assert.match(acl, /^pattern write k8s4r\/robots\/%u\/up\/#$/m);
  assert.match(acl, /^pattern read k8s4r\/robots\/%u\/down\/#$/m);
  assert.doesNotMatch(acl, /readwrite/);
  assert.match(renderTlsAcl(["k8s4r-server"]), /^user k8s4r-server\ntopic readwrite k8s4r\/#$/m);
  assert.equal(
    renderPlainAcl("k8s4r-server").split("\n").filter((l) => !l.startsWith("#")).join("\n"),
    "user k8s4r-server\ntopic readwrite k8s4r/#\n",
  );
  assert.throws(() => renderPlainAcl("bad user\ntopic readwrite #"), /invalid MQTT username/);
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
      runAsUser: "nobody",
    });
    const conf = await Deno.readTextFile(files.config);
    for (
      const line of [
        "per_listener_settings true",
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
        `acl_file ${files.tlsAcl}`,
        "listener 11883 127.0.0.1",
        `password_file ${files.passwordFile}`,
        `acl_file ${files.plainAcl}`,
      ]
    ) assert.ok(conf.split("\n").includes(line), `missing line: ${line}`);
    // Its PUBACK 0x95 breaks MQTT 5 clients (tests/broker_limits_test.ts): not written.
    assert.ok(!conf.includes("message_size_limit"));
    assert.equal(conf.split("\n").filter((l) => l === "allow_anonymous false").length, 2);
    // The plaintext password is nowhere but in the caller's memory.
    assert.ok(!conf.includes("pw-123"));
    const pw = await Deno.readTextFile(files.passwordFile);
    assert.ok(!pw.includes("pw-123"));
    assert.ok(verifyPassword("pw-123", pw.trim().slice("k8s4r-server:".length)));
    assert.equal((await Deno.stat(files.passwordFile)).mode! & 0o777, 0o600);
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
