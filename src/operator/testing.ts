/**
 * Test support for operator credentials: a control host whose SPIRE server is a test CA. Not
 * used by production code.
 */
import assert from "node:assert/strict";
import { RecordingRunner } from "../process/mod.ts";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import type { OperatorControl } from "./command.ts";

const TD = "k8s4r.test";

/** A control host whose `spire-server x509 mint` is played by a test CA writing the files. */
export function fakeControl(dir: string, lifetimeSeconds = 3600) {
  const spire = { ca: TestCa.create({ trustDomain: TD }) };
  const runner = new RecordingRunner((_cmd, args) => {
    const ca = spire.ca;
    if (args[0] === "bundle" && args[1] === "show") return { stdout: ca.rootPem };
    if (args[0] !== "x509" || args[1] !== "mint") return new Error(`unexpected ${args}`);
    const out = args[args.indexOf("-write") + 1];
    assert.equal(Deno.statSync(out).mode! & 0o777, 0o700, "mint writes into a private dir");
    const c = ca.issue({
      spiffeId: args[args.indexOf("-spiffeID") + 1],
      ttlSeconds: lifetimeSeconds,
    });
    Deno.writeTextFileSync(`${out}/svid.pem`, c.chainPem, { mode: 0o644 });
    Deno.writeTextFileSync(`${out}/key.pem`, c.keyPem, { mode: 0o600 });
    Deno.writeTextFileSync(`${out}/bundle.pem`, ca.rootPem, { mode: 0o644 });
    return {};
  });
  const env = { XDG_CONFIG_HOME: `${dir}/xdg`, HOME: dir };
  const ctl: OperatorControl = {
    env,
    runner,
    spireServerBin: "/opt/spire-server",
    spireSocket: `${dir}/api.sock`,
    rolesFile: `${dir}/roles.yaml`,
    trustDomain: TD,
    serverUrl: "https://localhost:8090",
  };
  return { spire, runner, env, ctl };
}
