/**
 * x509pop on the robot side, for real: `k8s4r agent csr` makes the robot's key (it never leaves
 * the robot) and a CSR; the test plays the factory CA and the control host (a real spire-server
 * with the x509pop NodeAttestor trusting the factory CA, in a config the test writes itself; a
 * node alias by certificate CN; the workload entry with `-dns <robotId>`); then
 * `k8s4r agent --enroll FILE --data-dir DIR` attests with proof of possession and connects.
 *
 * With a 20 s agent SVID, the stopped robot's SVID expires; `k8s4r agent --data-dir DIR` then
 * attests again on its own (no new credential) and connects: what a join-token robot cannot do.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { startControlHost } from "./helpers/control_host.ts";
import { startCli } from "./helpers/cli.ts";
import { processStartTime, waitFor } from "../src/process/mod.ts";
import { isAttested } from "../src/spire/agent.ts";
import { readAgentData } from "../src/spire/agent_state.ts";
import { parseCsrPem } from "../src/spiffe/csr.ts";

const ROBOT = "robot-088";

async function csr(dir: string, robotId = ROBOT): Promise<string> {
  const c = startCli(["agent", "csr", "--robot-id", robotId, "--data-dir", dir]);
  assert.equal(await c.exited, 0, c.stderr());
  return c.stdout();
}

Deno.test({
  name:
    "x509pop: agent csr keeps the key on the robot; --enroll attests and connects; after its SVID expired it re-attests on its own",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    const ch = await startControlHost({ x509pop: true, agentTtl: "20s" });
    const dir = join(ch.dir, "robot");
    const file = join(ch.dir, `${ROBOT}.enroll.json`);
    const pids: number[] = [];
    try {
      const csrPem = await csr(dir);
      const keyFile = join(dir, "x509pop", "agent.key");
      assert.equal((await Deno.stat(keyFile)).mode! & 0o777, 0o600);
      assert.equal(parseCsrPem(csrPem).commonName, ROBOT);
      // Again: the same key, not a new one.
      const key = await Deno.readTextFile(keyFile);
      assert.equal(parseCsrPem(await csr(dir)).spki.join(), parseCsrPem(csrPem).spki.join());
      assert.equal(await Deno.readTextFile(keyFile), key);

      const e = await ch.addX509popRobot(ROBOT, csrPem, file);
      const text = await Deno.readTextFile(file);
      assert.ok(!text.includes("PRIVATE KEY"), "a private key is in the enrollment file");

      await t.step(
        "a certificate for another key or another robot is refused before anything starts",
        async () => {
          const doc = JSON.parse(text);
          // The factory signed robot-088's name for a key made elsewhere (another host's CSR).
          const otherCsr = parseCsrPem(await csr(join(ch.dir, "elsewhere")));
          const stolen = ch.factory!.issueForPublicKey(otherCsr.publicKey, {
            commonName: ROBOT,
            keyUsage: ["digitalSignature"],
            ttlSeconds: 3600,
          });
          const wrongKey = join(ch.dir, "wrong-key.json");
          doc.attestation = {
            type: "x509pop",
            certificate: stolen.chainPem,
            expiresAt: new Date(stolen.certificate.validTo).toISOString(),
          };
          await Deno.writeTextFile(wrongKey, JSON.stringify(doc, null, 2), { mode: 0o600 });
          const r = startCli(["agent", "--enroll", wrongKey, "--data-dir", dir]);
          pids.push(r.pid);
          assert.equal(await r.exited, 1, r.stderr());
          assert.match(
            r.stderr(),
            /attestation\.certificate: the certificate is not for this robot's key .*agent\.key \(it was signed for another CSR\)/,
          );
          // Another robot's name on it: the CN rule.
          const otherName = ch.factory!.issueForPublicKey(parseCsrPem(csrPem).publicKey, {
            commonName: "robot-089",
            keyUsage: ["digitalSignature"],
          });
          doc.attestation.certificate = otherName.chainPem;
          doc.attestation.expiresAt = new Date(otherName.certificate.validTo).toISOString();
          const wrongName = join(ch.dir, "wrong-name.json");
          await Deno.writeTextFile(wrongName, JSON.stringify(doc, null, 2), { mode: 0o600 });
          const n = startCli(["agent", "--enroll", wrongName, "--data-dir", dir]);
          pids.push(n.pid);
          assert.equal(await n.exited, 2, n.stderr());
          assert.match(
            n.stderr(),
            /attestation\.certificate: expected a certificate for CN=robot-088, got CN=robot-089/,
          );
          assert.equal(await isAttested(dir), false, "a refused enrollment started an agent");
        },
      );

      await t.step("agent --enroll: x509pop attestation, connected", async () => {
        const agent = startCli(["agent", "--enroll", file, "--data-dir", dir]);
        pids.push(agent.pid);
        try {
          await ch.waitForRegister(ROBOT, 1);
          pids.push(...agent.children());
          const state = (await readAgentData(dir))!;
          assert.equal(state.attestor, "x509pop");
          assert.equal(state.reattestable, true);
          const conf = await Deno.readTextFile(join(dir, "k8s4r-agent", "spire-agent.conf"));
          assert.match(
            conf,
            new RegExp(
              `NodeAttestor "x509pop" \\{\\n\\s+plugin_data \\{\\n\\s+private_key_path = "${keyFile}"`,
            ),
          );
          assert.doesNotMatch(conf, /join_token/);
          assert.equal(e.attestation.type, "x509pop");
        } finally {
          assert.equal(await agent.stop(), 0, agent.stderr());
        }
        assert.match(agent.stderr(), /spire_agent\.starting attempt=0 withToken=false/);
      });

      await t.step("off past its agent SVID: re-attests on its own and connects", async () => {
        await waitFor(async () => !(await isAttested(dir)), {
          timeoutMs: 60_000,
          intervalMs: 500,
          what: "the stopped robot's agent SVID to expire",
        });
        const before = (await readAgentData(dir))!.svid!.notAfter.getTime();
        const agent = startCli(["agent", "--data-dir", dir]);
        pids.push(agent.pid);
        try {
          await ch.waitForRegister(ROBOT, 2);
          pids.push(...agent.children());
          const after = (await readAgentData(dir))!.svid!.notAfter.getTime();
          assert.ok(after > before, "no new agent SVID");
        } finally {
          assert.equal(await agent.stop(), 0, agent.stderr());
        }
        assert.match(agent.stderr(), /spire_agent\.svid_expired .* reattest=x509pop/);
        assert.match(agent.stderr(), /x509pop re-attests on its own/);
        assert.match(await ch.serverLog(), /x509pop/);
      });
    } finally {
      await ch.stop();
      for (const pid of pids) {
        assert.equal(processStartTime(pid), undefined, `process ${pid} survived the test`);
      }
    }
  },
});
