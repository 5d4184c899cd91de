import assert from "node:assert/strict";
import { CliError } from "../cli/errors.ts";
import { RecordingRunner } from "../process/mod.ts";
import {
  type AgentConfigValues,
  attestationError,
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
});

Deno.test("isAttested reads agent-data.json's svid, as SPIRE v1.13.3 writes it", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    assert.equal(await isAttested(dir), false);
    await Deno.writeTextFile(`${dir}/agent-data.json`, JSON.stringify({ svid: [], bundle: [] }));
    await Deno.writeTextFile(`${dir}/keys.json`, "{}");
    assert.equal(await isAttested(dir), false);
    await Deno.writeTextFile(
      `${dir}/agent-data.json`,
      JSON.stringify({ svid: ["LS0tLS1CRUdJTi..."], bundle: ["x"], reattestable: false }),
    );
    assert.equal(await isAttested(dir), true);
    await Deno.remove(`${dir}/keys.json`);
    assert.equal(await isAttested(dir), false);
    await Deno.writeTextFile(`${dir}/agent-data.json`, "{not json");
    assert.equal(await isAttested(dir), false);
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
