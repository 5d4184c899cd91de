/**
 * The SPIRE configs k8s4r renders, checked by the real SPIRE v1.13.3 (`validate`): the dev
 * stack's shorter sync and cache-reload intervals are settings SPIRE accepts, and a bad duration
 * is refused (the control that shows `validate` really reads them).
 */
import assert from "node:assert/strict";
import { renderAgentConfig } from "../src/spire/agent.ts";
import { renderServerConfig } from "../src/spire/server.ts";
import { spireBinaries } from "./helpers/spire.ts";

async function validate(bin: string, hcl: string): Promise<{ code: number; out: string }> {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-cfg-" });
  try {
    await Deno.writeTextFile(`${dir}/x.conf`, hcl.replaceAll("/DIR", dir));
    const out = await new Deno.Command(bin, {
      args: ["validate", "-config", `${dir}/x.conf`],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const d = new TextDecoder();
    return { code: out.code, out: d.decode(out.stdout) + d.decode(out.stderr) };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("real spire-server validates the rendered config, with and without the dev settings", async () => {
  const { server } = await spireBinaries();
  for (
    const [cacheReloadInterval, attestationRateLimit, eventsBasedCache] of [
      [undefined, undefined, undefined],
      ["100ms", false, true],
    ] as const
  ) {
    const r = await validate(
      server,
      renderServerConfig({
        dataDir: "/DIR",
        cacheReloadInterval,
        attestationRateLimit,
        eventsBasedCache,
      }),
    );
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, /configuration file is valid/);
  }
  const bad = await validate(
    server,
    renderServerConfig({ dataDir: "/DIR", cacheReloadInterval: "5 sec" }),
  );
  assert.notEqual(bad.code, 0);
  assert.match(bad.out, /cache reload interval/);
});

Deno.test("real spire-agent validates the rendered config, with and without sync_interval", async () => {
  const { agent } = await spireBinaries();
  const values = {
    trustDomain: "k8s4r.example.org",
    serverAddress: "127.0.0.1",
    serverPort: 8081,
    socketPath: "/DIR/agent.sock",
    dataDir: "/DIR/data",
    trustBundlePath: "/DIR/bundle.pem",
    logLevel: "INFO" as const,
  };
  for (const syncInterval of [undefined, "500ms"]) {
    const r = await validate(agent, renderAgentConfig({ ...values, syncInterval }));
    assert.equal(r.code, 0, r.out);
    assert.match(r.out, /configuration file is valid/);
  }
  const bad = await validate(agent, renderAgentConfig({ ...values, syncInterval: "fast" }));
  assert.notEqual(bad.code, 0);
  assert.match(bad.out, /sync/i);
});

Deno.test("real spire-server validates the HA config: postgres datastore, UpstreamAuthority disk, health_checks, agent_ttl", async () => {
  const { server } = await spireBinaries();
  const r = await validate(
    server,
    renderServerConfig({
      dataDir: "/DIR",
      datastore: {
        type: "postgres",
        connectionString: "host='127.0.0.1' port=5 user='spire' password='x' dbname='spire'",
      },
      upstreamAuthority: {
        certFile: "/DIR/up.crt",
        keyFile: "/DIR/up.key",
        bundleFile: "/DIR/root.crt",
      },
      healthChecks: { bindAddress: "127.0.0.1", port: 8099 },
      agentTtl: "1m",
    }),
  );
  assert.equal(r.code, 0, r.out);
  assert.match(r.out, /configuration file is valid/);
  const bad = await validate(server, renderServerConfig({ dataDir: "/DIR", agentTtl: "soon" }));
  assert.notEqual(bad.code, 0, "an unparsable agent_ttl was accepted: validate reads nothing");
});
