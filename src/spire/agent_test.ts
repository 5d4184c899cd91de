import assert from "node:assert/strict";
import { CliError } from "../cli/errors.ts";
import { RecordingRunner } from "../process/mod.ts";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import { writeAgentData } from "./testing.ts";
import {
  type AgentConfigValues,
  attestationError,
  GO_DURATION,
  isAttested,
  prepareSocketDir,
  renderAgentConfig,
  SpireAgentSupervisor,
} from "./agent.ts";

const VALUES: AgentConfigValues = {
  trustDomain: "k8s4r.example.org",
  serverAddress: "127.0.0.1",
  serverPort: 8081,
  socketPath: "/tmp/spire-agent/agent.sock",
  dataDir: "/p/.spire-data/agent",
  trustBundlePath: "/p/config/mosquitto/certs/spire-ca.crt",
  logLevel: "DEBUG",
};

Deno.test("renderAgentConfig: secure bootstrap, join_token, unix attestor, disk keys", () => {
  const hcl = renderAgentConfig(VALUES);
  assert.match(hcl, /trust_bundle_path = "\/p\/config\/mosquitto\/certs\/spire-ca\.crt"/);
  assert.doesNotMatch(hcl, /insecure_bootstrap/);
  assert.match(hcl, /NodeAttestor "join_token"/);
  assert.match(hcl, /WorkloadAttestor "unix"/);
  assert.match(
    hcl,
    /KeyManager "disk" \{\n\s+plugin_data \{\n\s+directory = "\/p\/\.spire-data\/agent"/,
  );
  assert.match(hcl, /server_port = 8081\n/);
  assert.match(hcl, /socket_path = "\/tmp\/spire-agent\/agent\.sock"/);
  assert.match(hcl, /log_level = "DEBUG"/);
  // No token in the config: it travels only as -joinTokenFile.
  assert.doesNotMatch(hcl, /join_token\s*=/);
  // Quoting survives odd characters.
  assert.match(renderAgentConfig({ ...VALUES, dataDir: '/a "b"' }), /data_dir = "\/a \\"b\\""/);
  // SPIRE's own sync interval unless one is asked for.
  assert.doesNotMatch(hcl, /experimental|sync_interval/);
  assert.ok(
    renderAgentConfig({ ...VALUES, syncInterval: "500ms" }).includes(
      'log_level = "DEBUG"\n\n  experimental {\n    sync_interval = "500ms"\n  }\n}\n',
    ),
  );
});

Deno.test("GO_DURATION accepts what SPIRE's time.ParseDuration does, nothing else", () => {
  for (const ok of ["500ms", "5s", "1m30s", "1.5s", "100us"]) assert.match(ok, GO_DURATION);
  for (const bad of ["", "5", "5 s", "-1s", "5sec", "s"]) assert.doesNotMatch(bad, GO_DURATION);
});

Deno.test("isAttested reads agent-data.json's svid, as SPIRE v1.13.3 writes it, and its expiry", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-" });
  const ca = TestCa.create({ trustDomain: "k8s4r.example.org" });
  const agentId = "spiffe://k8s4r.example.org/spire/agent/join_token/abc";
  try {
    assert.equal(await isAttested(dir), false);
    await Deno.writeTextFile(`${dir}/agent-data.json`, JSON.stringify({ svid: [], bundle: [] }));
    await Deno.writeTextFile(`${dir}/keys.json`, "{}");
    assert.equal(await isAttested(dir), false);
    await writeAgentData(dir, ca.issue({ spiffeId: agentId, ttlSeconds: 3600 }), ca, false);
    assert.equal(await isAttested(dir), true);
    // An expired agent SVID: spire-agent attests again, so the agent is not attested any more.
    assert.equal(await isAttested(dir, Date.now() + 3600_000), false);
    await writeAgentData(dir, ca.issueExpired({ spiffeId: agentId }), ca, false);
    assert.equal(await isAttested(dir), false);
    await writeAgentData(dir, ca.issue({ spiffeId: agentId }), ca, false);
    await Deno.remove(`${dir}/keys.json`);
    assert.equal(await isAttested(dir), false);
    await Deno.writeTextFile(`${dir}/keys.json`, "{}");
    await Deno.writeTextFile(`${dir}/agent-data.json`, "{not json");
    assert.equal(await isAttested(dir), false);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("renderAgentConfig: the x509pop NodeAttestor with the robot's key and certificate", () => {
  const hcl = renderAgentConfig({
    ...VALUES,
    nodeAttestor: {
      type: "x509pop",
      privateKeyPath: "/var/lib/k8s4r/x509pop/agent.key",
      certificatePath: "/var/lib/k8s4r/x509pop/agent.crt",
    },
  });
  assert.match(
    hcl,
    /NodeAttestor "x509pop" \{\n\s+plugin_data \{\n\s+private_key_path = "\/var\/lib\/k8s4r\/x509pop\/agent\.key"\n\s+certificate_path = "\/var\/lib\/k8s4r\/x509pop\/agent\.crt"\n/,
  );
  assert.doesNotMatch(hcl, /join_token/);
  assert.match(renderAgentConfig(VALUES), /NodeAttestor "join_token"/);
});

Deno.test("supervisor: an x509pop agent starts without a join token", async () => {
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-" });
  const runner = new RecordingRunner();
  try {
    const sup = new SpireAgentSupervisor({
      ...VALUES,
      dataDir: `${dir}/data`,
      socketPath: `${dir}/s/agent.sock`,
      runner,
      bin: "/bin/false",
      configPath: `${dir}/agent.conf`,
      logFile: `${dir}/agent.log`,
      nodeAttestor: { type: "x509pop", privateKeyPath: `${dir}/k`, certificatePath: `${dir}/c` },
      readyTimeoutMs: 200,
    });
    // The recording runner's daemon never serves: the start times out, but after the spawn.
    await assert.rejects(sup.start());
    await sup.stop();
    assert.equal(runner.calls.length >= 1, true);
    assert.deepEqual(runner.calls[0].args, ["run", "-config", `${dir}/agent.conf`]);
    assert.match(await Deno.readTextFile(`${dir}/agent.conf`), /NodeAttestor "x509pop"/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("prepareSocketDir: creates 0755, refuses our world-writable dir, refuses long paths", async () => {
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-" });
  try {
    await prepareSocketDir(`${dir}/s/agent.sock`);
    assert.equal((Deno.statSync(`${dir}/s`).mode ?? 0) & 0o777, 0o755);
    await Deno.chmod(`${dir}/s`, 0o777);
    // Refused, not fixed: someone may already have put a socket there.
    await assert.rejects(prepareSocketDir(`${dir}/s/agent.sock`), /writable by group and others/);
    await assert.rejects(
      prepareSocketDir(`${dir}/${"x".repeat(120)}/agent.sock`),
      /socket path is too long/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("supervisor: not attested and no token file is a clear error, before any spawn", async () => {
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-" });
  const runner = new RecordingRunner();
  const base = {
    ...VALUES,
    runner,
    bin: "/bin/spire-agent",
    configPath: `${dir}/conf/agent.conf`,
    dataDir: `${dir}/data`,
    socketPath: `${dir}/sock/agent.sock`,
    logFile: `${dir}/agent.log`,
  };
  try {
    await assert.rejects(new SpireAgentSupervisor(base).start(), (e: CliError) => {
      assert.match(e.message, /has not attested yet and no join token was given/);
      assert.match(e.hint ?? "", /SPIRE_JOIN_TOKEN/);
      return true;
    });
    // A token file readable by others is refused too.
    await Deno.writeTextFile(`${dir}/token`, "t", { mode: 0o644 });
    await Deno.chmod(`${dir}/token`, 0o644);
    await assert.rejects(
      new SpireAgentSupervisor({ ...base, joinTokenFile: `${dir}/token` }).start(),
      /token is readable by others|readable by others .*must be 0600/,
    );
    await assert.rejects(
      new SpireAgentSupervisor({ ...base, joinTokenFile: `${dir}/missing` }).start(),
      /join token file .*missing does not exist/,
    );
    assert.equal(runner.calls.length, 0);
    // The config was written (0700 dir) with the values.
    assert.equal((Deno.statSync(`${dir}/conf`).mode ?? 0) & 0o777, 0o700);
    assert.match(Deno.readTextFileSync(base.configPath), /trust_bundle_path/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("attestationError finds a rejected attestation after the given offset", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    const log = `${dir}/agent.log`;
    assert.equal(await attestationError(log), undefined);
    const old = 'level=warning msg="x" error="failed to attest: old reason"\n';
    await Deno.writeTextFile(log, old);
    // Captured from spire-agent v1.13.3 with a bogus token.
    await Deno.writeTextFile(
      log,
      `time="2026-11-30T09:39:14Z" level=warning msg="Failed to retrieve attestation result" error="failed to receive attestation response: rpc error: code = InvalidArgument desc = failed to attest: join token does not exist or has already been used" retry_interval=8.007436314s\n`,
      { append: true },
    );
    assert.equal(await attestationError(log), "old reason");
    assert.equal(
      await attestationError(log, old.length),
      "join token does not exist or has already been used",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
