/**
 * The fleet server's identity for a real `k8s4r server` in tests and benchmarks: its SVID
 * (`spiffe://<td>/fleet-server`, DNS localhost) of a TestHttps CA served by a FakeWorkloadApi,
 * and a roles file that makes `web.admin` an operator. `args` are the server's flags for them.
 */
import { join } from "node:path";
import { fleetServerSpiffeId } from "../../src/fleet/ids.ts";
import { TEST_TD, TestHttps } from "../../src/server/testing.ts";
import { FakeWorkloadApi } from "../../src/spiffe/testing/fake_workload_api.ts";

export interface ServerIdentity {
  web: TestHttps;
  args: string[];
  close(): Promise<void>;
}

/** The SVID lives `ttlSeconds`; `svidTimeoutSeconds` adds `--svid-timeout`. */
export async function fleetServerIdentity(
  dir: string,
  o: { ttlSeconds: number; svidTimeoutSeconds?: number },
): Promise<ServerIdentity> {
  const web = new TestHttps(TEST_TD);
  const fake = await FakeWorkloadApi.start();
  const close = async () => {
    web.close();
    await fake.close();
  };
  try {
    const svid = web.ca.issue({
      spiffeId: fleetServerSpiffeId(TEST_TD),
      dnsNames: ["localhost"],
      ttlSeconds: o.ttlSeconds,
    });
    fake.setX509Svids([svid], { [TEST_TD]: svid.bundleDer });
    const roles = join(dir, "roles.yaml");
    await Deno.writeTextFile(roles, "operators:\n  admin: operator\n");
    return {
      web,
      args: [
        "--socket-path",
        fake.socketPath,
        "--spiffe-id",
        fleetServerSpiffeId(TEST_TD),
        "--roles",
        roles,
        ...(o.svidTimeoutSeconds === undefined
          ? []
          : ["--svid-timeout", String(o.svidTimeoutSeconds)]),
      ],
      close,
    };
  } catch (err) {
    await close();
    throw err;
  }
}
