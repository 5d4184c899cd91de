/** Test support: a SPIRE agent data directory as SPIRE v1.13.3 leaves it (pkg/agent/storage). */
import { Buffer } from "node:buffer";
import type { IssuedCert, TestCa } from "../spiffe/testing/test_ca.ts";

const b64 = (pem: string) => Buffer.from(pem, "utf8").toString("base64");

/**
 * Writes `agent-data.json` (each certificate as base64 of its PEM, as Go's []byte marshals) and
 * a `keys.json`, as an attested agent has them.
 */
export async function writeAgentData(
  dir: string,
  svid: IssuedCert,
  ca: TestCa,
  reattestable: boolean,
): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  const pems = svid.chainPem.match(
    /-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----\n?/g,
  )!;
  await Deno.writeTextFile(
    `${dir}/agent-data.json`,
    JSON.stringify({
      svid: pems.map(b64),
      bundle: [b64(ca.rootPem)],
      reattestable,
      bootstrap_use: 0,
      bootstrap_start_time: "0001-01-01T00:00:00Z",
      connection_attempts: 0,
    }),
    { mode: 0o600 },
  );
  await Deno.writeTextFile(`${dir}/keys.json`, "{}", { mode: 0o600 });
}
