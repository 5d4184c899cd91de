import assert from "node:assert/strict";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import { judgeAgentSvid, readAgentData } from "./agent_state.ts";
import { writeAgentData } from "./testing.ts";

const TD = "k8s4r.example.org";
const TOKEN = "0f5a2c1e-4b7d-4e1a-9c3b-7d2e6f8a9b10";

async function withDir(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-state-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("readAgentData: the agent SVID, its attestor, SPIRE's reattestable flag, the bundle; the token redacted", async () => {
  await withDir(async (dir) => {
    assert.equal(await readAgentData(dir), undefined);
    const ca = TestCa.create({ trustDomain: TD });
    const svid = ca.issue({
      spiffeId: `spiffe://${TD}/spire/agent/join_token/${TOKEN}`,
      ttlSeconds: 3600,
    });
    await writeAgentData(dir, svid, ca, false);
    const s = (await readAgentData(dir))!;
    assert.equal(s.attested, true);
    assert.equal(s.attestor, "join_token");
    assert.equal(s.reattestable, false);
    assert.equal(s.spiffeId, `spiffe://${TD}/spire/agent/join_token/<redacted>`);
    assert.ok(!JSON.stringify(s).includes(TOKEN), "the token leaks out of readAgentData");
    assert.equal(s.svid!.notAfter.getTime(), new Date(svid.certificate.validTo).getTime());
    assert.equal(s.bundle.length, 1);
    assert.equal(s.bundle[0].notAfter.getTime(), new Date(ca.root.validTo).getTime());

    const pop = ca.issue({ spiffeId: `spiffe://${TD}/spire/agent/x509pop/ab12cd`, ttlSeconds: 60 });
    await writeAgentData(dir, pop, ca, true);
    const p = (await readAgentData(dir))!;
    assert.equal(p.attestor, "x509pop");
    assert.equal(p.reattestable, true);

    await Deno.remove(`${dir}/keys.json`);
    assert.equal((await readAgentData(dir))!.attested, false, "no key: not attested");
    await Deno.writeTextFile(`${dir}/agent-data.json`, "{broken");
    await assert.rejects(readAgentData(dir), SyntaxError);
  });
});

Deno.test("judgeAgentSvid: valid, expired (join token: locked out; x509pop: re-attests), clock behind", async () => {
  await withDir(async (dir) => {
    const ca = TestCa.create({ trustDomain: TD });
    const now = Date.now();
    assert.deepEqual(judgeAgentSvid(undefined, now), { kind: "none" });

    await writeAgentData(
      dir,
      ca.issue({ spiffeId: `spiffe://${TD}/spire/agent/join_token/${TOKEN}`, ttlSeconds: 3600 }),
      ca,
      false,
    );
    const fresh = (await readAgentData(dir))!;
    const v = judgeAgentSvid(fresh, now);
    assert.equal(v.kind, "valid");
    // Off for two hours: past the agent SVID's one-hour lifetime.
    const later = judgeAgentSvid(fresh, now + 2 * 3600_000);
    assert.deepEqual(later, {
      kind: "expired",
      notAfter: fresh.svid!.notAfter,
      reattestable: false,
    });
    // SPIRE's rule: expired one second before notAfter.
    assert.equal(judgeAgentSvid(fresh, fresh.svid!.notAfter.getTime() - 500).kind, "expired");
    assert.equal(judgeAgentSvid(fresh, fresh.svid!.notAfter.getTime() - 1500).kind, "valid");
    // The configured attestation wins over the cached flag.
    const asPop = judgeAgentSvid(fresh, now + 2 * 3600_000, "x509pop");
    assert.equal(asPop.kind === "expired" && asPop.reattestable, true);

    // A clock 3 h behind the certificate's issue time.
    const behind = judgeAgentSvid(fresh, fresh.svid!.notBefore.getTime() - 3 * 3600_000);
    assert.deepEqual(behind, {
      kind: "not-yet-valid",
      notBefore: fresh.svid!.notBefore,
      behindMs: 3 * 3600_000,
    });

    await writeAgentData(
      dir,
      ca.issueExpired({ spiffeId: `spiffe://${TD}/spire/agent/x509pop/ab12`, agoSeconds: 7200 }),
      ca,
      true,
    );
    const old = judgeAgentSvid(await readAgentData(dir), now);
    assert.equal(old.kind, "expired");
    assert.equal(old.kind === "expired" && old.reattestable, true);
  });
});
