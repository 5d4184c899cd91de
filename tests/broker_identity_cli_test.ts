/**
 * `k8s4r broker identity` (the real CLI) against a Workload API: it writes the broker's
 * certificate, key (0600) and CA where mosquitto.conf points, and runs the operator's reload
 * command only when the certificate really changed, the restart command when the bundle did.
 * The commands here append to a file, so what ran is counted, not guessed.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { FakeWorkloadApi } from "../src/spiffe/testing/fake_workload_api.ts";
import { TestCa } from "../src/spiffe/testing/test_ca.ts";
import { startCli } from "./helpers/cli.ts";

const TD = "k8s4r.example.org";

Deno.test({
  name:
    "broker identity: files written, reload only when the certificate changed, restart on a new bundle",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const fake = await FakeWorkloadApi.start();
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-bi-" });
    try {
      const ca = TestCa.create({ trustDomain: TD });
      const issue = () =>
        ca.issue({ spiffeId: `spiffe://${TD}/mqtt-broker`, dnsNames: ["broker.example.org"] });
      fake.setX509Svids([issue()], { [TD]: ca.rootDer });
      const ran = join(dir, "ran.log");
      const files = {
        cert: join(dir, "m", "broker.crt"),
        key: join(dir, "m", "broker.key"),
        ca: join(dir, "certs", "spire-ca.crt"),
      };
      // --reload is split on spaces (no shell): a script counts the reloads.
      await Deno.writeTextFile(join(dir, "reload.sh"), `#!/bin/sh\necho reload >> ${ran}\n`, {
        mode: 0o755,
      });
      const run = async () => {
        const p = startCli([
          "broker",
          "identity",
          "--socket",
          fake.socketPath,
          "--cert",
          files.cert,
          "--key",
          files.key,
          "--ca",
          files.ca,
          "--reload",
          join(dir, "reload.sh"),
          "--restart",
          `/usr/bin/touch ${join(dir, "restarted")}`,
          "--once",
        ]);
        const code = await p.exited;
        assert.equal(code, 0, `${p.stdout()}\n${p.stderr()}`);
        return p.stdout();
      };
      const reloads = async () =>
        (await Deno.readTextFile(ran).catch(() => "")).split("\n").filter(Boolean).length;

      // First run: nothing on disk: files, the CA export -> a restart (new cafile), no reload.
      const out1 = await run();
      assert.match(out1, /wrote SVID spiffe:\/\/k8s4r\.example\.org\/mqtt-broker/);
      assert.equal((await Deno.stat(files.key)).mode! & 0o777, 0o600);
      assert.ok((await Deno.stat(join(dir, "restarted"))).isFile, "restart command not run");
      assert.equal(await reloads(), 0);
      // Same SVID again: nothing written, nothing run.
      await Deno.remove(join(dir, "restarted"));
      const out2 = await run();
      assert.doesNotMatch(out2, /wrote SVID/);
      assert.equal(await reloads(), 0, "a reload for an unchanged certificate");
      await assert.rejects(() => Deno.stat(join(dir, "restarted")));
      // A renewed SVID: written, one reload.
      fake.setX509Svids([issue()], { [TD]: ca.rootDer });
      await run();
      assert.equal(await reloads(), 1);
      await run();
      assert.equal(await reloads(), 1, "renewal announced twice");
    } finally {
      await fake.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("broker identity: usage errors exit 2", async () => {
  const p = startCli(["broker", "identity", "--cert", "/x"]);
  assert.equal(await p.exited, 2);
  assert.match(p.stderr(), /broker identity: --socket is required/);
});
