import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { X509Bundle, X509BundleSet } from "./bundle.ts";
import { countSignatureChecks, mutuallyIssuingChain, TestCa } from "./testing/test_ca.ts";
import {
  FailedChainCache,
  MAX_CHAIN_CERTS,
  MAX_SIGNATURE_CHECKS,
  VerificationError,
  verifyX509Svid,
  verifyX509SvidChain,
} from "./verify.ts";

const ca = TestCa.create({ trustDomain: "td", commonName: "td root" });
const bundles = new X509BundleSet([X509Bundle.fromDer("td", ca.rootDer)]);

function rejects(fn: () => unknown, expected: string | RegExp) {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof VerificationError, String(err));
    if (typeof expected === "string") assert.equal(err.message, expected);
    else assert.match(err.message, expected);
    return true;
  });
}

Deno.test("verifyX509Svid accepts a leaf issued by the root and through intermediates", () => {
  const s = ca.issue({ spiffeId: "spiffe://td/a" });
  assert.equal(verifyX509Svid(s.certificates, bundles).toString(), "spiffe://td/a");
  const i2 = ca.intermediate().intermediate();
  const deep = i2.issue({ spiffeId: "spiffe://td/deep" });
  assert.equal(deep.certificates.length, 3);
  const r = verifyX509SvidChain(deep.certificates, bundles);
  assert.equal(r.id.toString(), "spiffe://td/deep");
  assert.equal(r.chain.length, 4);
  assert.equal(r.chain[3].raw.toString("hex"), ca.root.raw.toString("hex"));
  // Intermediates in any order.
  const shuffled = [deep.certificates[0], deep.certificates[2], deep.certificates[1]];
  assert.equal(verifyX509Svid(shuffled, bundles).toString(), "spiffe://td/deep");
});

Deno.test("verifyX509Svid rejects an expired or not-yet-valid SVID", () => {
  const s = ca.issue({
    spiffeId: "spiffe://td/a",
    notBefore: new Date("2026-01-01T00:00:00Z"),
    notAfter: new Date("2026-01-01T01:00:00Z"),
  });
  rejects(
    () => verifyX509Svid(s.certificates, bundles, new Date("2026-01-01T02:00:00Z")),
    "leaf certificate spiffe://td/a expired at 2026-01-01T01:00:00.000Z (now 2026-01-01T02:00:00.000Z)",
  );
  rejects(
    () => verifyX509Svid(s.certificates, bundles, new Date("2025-12-31T23:00:00Z")),
    "leaf certificate spiffe://td/a is not valid before 2026-01-01T00:00:00.000Z (now 2025-12-31T23:00:00.000Z)",
  );
  const expired = ca.issueExpired({ spiffeId: "spiffe://td/old" });
  rejects(
    () => verifyX509Svid(expired.certificates, bundles),
    /^leaf certificate spiffe:\/\/td\/old expired at /,
  );
});

Deno.test("verifyX509Svid rejects an expired intermediate or root", () => {
  const inter = ca.intermediate({
    notBefore: new Date(Date.now() - 7200_000),
    notAfter: new Date(Date.now() - 60_000),
  });
  const s = inter.issue({ spiffeId: "spiffe://td/a" });
  rejects(
    () => verifyX509Svid(s.certificates, bundles),
    /^intermediate CA "O=SPIFFE, CN=td test intermediate CA" expired at /,
  );
  const oldRoot = TestCa.create({
    trustDomain: "td",
    notBefore: new Date(Date.now() - 7200_000),
    notAfter: new Date(Date.now() - 60_000),
  });
  const s2 = oldRoot.issue({ spiffeId: "spiffe://td/a", notAfter: new Date(Date.now() + 60_000) });
  rejects(
    () =>
      verifyX509Svid(
        s2.certificates,
        new X509BundleSet([X509Bundle.fromDer("td", oldRoot.rootDer)]),
      ),
    /^CA "O=SPIFFE, CN=td test root CA" of the bundle for td expired at /,
  );
});

Deno.test("verifyX509Svid rejects an SVID from another trust domain", () => {
  const other = TestCa.create({ trustDomain: "other.org" });
  const s = other.issue({ spiffeId: "spiffe://other.org/a" });
  rejects(
    () => verifyX509Svid(s.certificates, bundles),
    'no X.509 bundle for trust domain "other.org" (the trust domain of spiffe://other.org/a)',
  );
});

Deno.test("verifyX509Svid rejects a chain the bundle does not anchor", () => {
  const impostor = TestCa.create({ trustDomain: "td", commonName: "impostor" });
  const s = impostor.issue({ spiffeId: "spiffe://td/a" });
  rejects(
    () => verifyX509Svid(s.certificates, bundles),
    'leaf certificate spiffe://td/a (issuer "O=SPIFFE, CN=impostor") is not issued under the X.509 bundle for "td" (1 CA)',
  );
  // Missing intermediate.
  const inter = ca.intermediate();
  const s2 = inter.issue({ spiffeId: "spiffe://td/b" });
  rejects(() => verifyX509Svid([s2.certificate], bundles), /is not issued under the X\.509 bundle/);
});

Deno.test("verifyX509Svid rejects CA leaves, no certificates and empty bundles", () => {
  const s = ca.issue({ spiffeId: "spiffe://td/a", isCa: true });
  rejects(
    () => verifyX509Svid(s.certificates, bundles),
    "leaf certificate spiffe://td/a must not be a CA (basicConstraints cA is true)",
  );
  rejects(() => verifyX509Svid([], bundles), "no certificates to verify");
  const ok = ca.issue({ spiffeId: "spiffe://td/a" });
  rejects(
    () => verifyX509Svid(ok.certificates, new X509BundleSet([new X509Bundle("td", [])])),
    'the X.509 bundle for "td" is empty',
  );
  const noUri = ca.issue({ dnsNames: ["x"] });
  rejects(
    () => verifyX509Svid(noUri.certificates, bundles),
    "leaf certificate has no URI SAN (expected a SPIFFE ID)",
  );
});

Deno.test("path building: 7 CA certificates that all issue each other (one subject, one key) fail within 64 signature checks", () => {
  const hostile = mutuallyIssuingChain({ spiffeId: "spiffe://td/attacker", count: 7 });
  assert.equal(hostile.certificates.length, 8);
  // They do issue each other: any one verifies under any other's key.
  assert.ok(hostile.certificates[3].checkIssued(hostile.certificates[5]));
  assert.ok(hostile.certificates[3].verify(hostile.certificates[5].publicKey));
  const r = countSignatureChecks(() => verifyX509SvidChain(hostile.certificates, bundles));
  const checks = r.checks;
  assert.ok(r.error instanceof VerificationError, `not refused: ${String(r.error ?? r.result)}`);
  assert.equal(
    r.error.message,
    'leaf certificate spiffe://td/attacker (issuer "O=SPIFFE, CN=mutual issuer") is not issued under the X.509 bundle for "td" (1 CA)',
  );
  assert.ok(checks <= 64, `${checks} signature checks`);
});

Deno.test("path building: one subject and key identifier, a key each: every pair tried once, within the budget", () => {
  const hostile = mutuallyIssuingChain({
    spiffeId: "spiffe://td/attacker",
    count: 7,
    sharedKey: false,
  });
  assert.ok(hostile.certificates[3].checkIssued(hostile.certificates[5]));
  assert.ok(hostile.certificates[3].verify(hostile.certificates[4].publicKey));
  assert.ok(!hostile.certificates[3].verify(hostile.certificates[5].publicKey));
  // Intermediates in the worst order: each one's issuer is the last candidate tried.
  const worst = [hostile.certificates[0], ...hostile.certificates.slice(1).reverse()];
  const r = countSignatureChecks(() => verifyX509SvidChain(worst, bundles));
  assert.ok(r.error instanceof VerificationError, `not refused: ${String(r.error ?? r.result)}`);
  assert.match(
    r.error.message,
    /^leaf certificate spiffe:\/\/td\/attacker \(issuer .* is not issued/,
  );
  // 7 + 6 + ... + 1: each (certificate, candidate issuer) at most once, none visited twice.
  assert.equal(r.checks, 28);

  // The same, naming the bundle's root (its subject and key id) too: the root's key is tried
  // on every certificate, and the budget ends it.
  const rootKeyId = new Uint8Array(
    createHash("sha1").update(ca.root.publicKey.export({ type: "spki", format: "der" })).digest(),
  );
  const asRoot = mutuallyIssuingChain({
    spiffeId: "spiffe://td/attacker",
    count: 7,
    sharedKey: false,
    commonName: "td root",
    keyId: rootKeyId,
  });
  assert.ok(asRoot.certificates[2].checkIssued(ca.root));
  const worst2 = [asRoot.certificates[0], ...asRoot.certificates.slice(1).reverse()];
  const r2 = countSignatureChecks(() => verifyX509SvidChain(worst2, bundles));
  assert.ok(r2.error instanceof VerificationError, `not refused: ${String(r2.error ?? r2.result)}`);
  assert.equal(
    r2.error.message,
    `leaf certificate spiffe://td/attacker: no path to the X.509 bundle for "td" within ${MAX_SIGNATURE_CHECKS} signature checks (8 certificates that name each other as issuers)`,
  );
  assert.equal(r2.checks, MAX_SIGNATURE_CHECKS);
  assert.ok(MAX_SIGNATURE_CHECKS <= 64);
});

Deno.test("path building (control): intermediates in any order, a leaf under the root, few checks", () => {
  const direct = ca.issue({ spiffeId: "spiffe://td/direct" });
  const d = countSignatureChecks(() => verifyX509SvidChain(direct.certificates, bundles));
  assert.equal(d.result?.id.toString(), "spiffe://td/direct", String(d.error));
  assert.equal(d.result?.chain.length, 2);
  assert.ok(d.checks <= 2, `${d.checks} signature checks`);

  const deep = ca.intermediate({ commonName: "i1" }).intermediate({ commonName: "i2" }).issue({
    spiffeId: "spiffe://td/deep",
  });
  const [leaf, i2, i1] = deep.certificates;
  for (const order of [[leaf, i2, i1], [leaf, i1, i2]]) {
    const r = countSignatureChecks(() => verifyX509SvidChain(order, bundles));
    assert.equal(r.result?.id.toString(), "spiffe://td/deep", String(r.error));
    assert.deepEqual(
      r.result?.chain.map((c) => c.fingerprint256),
      [leaf, i2, i1, ca.root].map((c) => c.fingerprint256),
    );
    assert.ok(r.checks <= 6, `${r.checks} signature checks`);
  }
  // The hostile CAs added to a good chain do not hide its path.
  const hostile = mutuallyIssuingChain({ spiffeId: "spiffe://td/attacker", count: 4 });
  const mixed = [leaf, ...hostile.certificates.slice(1), i1, i2];
  const m = countSignatureChecks(() => verifyX509SvidChain(mixed, bundles));
  assert.equal(m.result?.chain.length, 4, String(m.error));
  assert.ok(m.checks <= 64, `${m.checks} signature checks`);
});

Deno.test("a chain of more than 8 certificates is refused before any signature check; 8 verify", () => {
  let cur = ca;
  const cas: TestCa[] = [];
  for (let i = 0; i < 8; i++) cas.push(cur = cur.intermediate({ commonName: `i${i + 1}` }));
  const eight = cas[6].issue({ spiffeId: "spiffe://td/seven-deep" });
  assert.equal(eight.certificates.length, 8);
  assert.equal(verifyX509Svid(eight.certificates, bundles).toString(), "spiffe://td/seven-deep");
  const nine = cas[7].issue({ spiffeId: "spiffe://td/eight-deep" });
  assert.equal(nine.certificates.length, 9);
  const r = countSignatureChecks(() => verifyX509SvidChain(nine.certificates, bundles));
  assert.ok(r.error instanceof VerificationError, `not refused: ${String(r.error ?? r.result)}`);
  assert.equal(
    r.error.message,
    `a chain of more than ${MAX_CHAIN_CERTS} certificates (the leaf and its intermediates) is refused`,
  );
  assert.equal(r.checks, 0);
});

Deno.test("failed chains are remembered per bundle for a while, boundedly; successes are not", () => {
  const failures = new FailedChainCache(2, 30_000);
  const hostile = mutuallyIssuingChain({ spiffeId: "spiffe://td/attacker", count: 7 });
  const t0 = new Date();
  const first = countSignatureChecks(() =>
    verifyX509SvidChain(hostile.certificates, bundles, t0, { failures })
  );
  assert.ok(first.error instanceof VerificationError);
  assert.ok(first.checks > 0);
  assert.equal(failures.size, 1);
  // Presented again: the same refusal, no signature check.
  const again = countSignatureChecks(() =>
    verifyX509SvidChain(hostile.certificates, bundles, new Date(t0.getTime() + 1000), {
      failures,
    })
  );
  assert.ok(again.error instanceof VerificationError);
  assert.equal(again.error.message, first.error.message);
  assert.equal(again.checks, 0);
  // Another bundle object (the source updated): judged again.
  const other = new X509BundleSet([X509Bundle.fromDer("td", ca.rootDer)]);
  const rebundled = countSignatureChecks(() =>
    verifyX509SvidChain(hostile.certificates, other, t0, { failures })
  );
  assert.ok(rebundled.error instanceof VerificationError);
  assert.ok(rebundled.checks > 0);
  // Past the TTL: judged again.
  const late = countSignatureChecks(() =>
    verifyX509SvidChain(hostile.certificates, bundles, new Date(t0.getTime() + 31_000), {
      failures,
    })
  );
  assert.ok(late.checks > 0);
  // Control: a good chain verifies every time and is not remembered as a failure.
  const good = ca.intermediate().issue({ spiffeId: "spiffe://td/good" });
  const size = failures.size;
  for (let i = 0; i < 2; i++) {
    const ok = countSignatureChecks(() =>
      verifyX509SvidChain(good.certificates, bundles, t0, { failures })
    );
    assert.equal(ok.result?.id.toString(), "spiffe://td/good", String(ok.error));
    assert.ok(ok.checks > 0);
  }
  assert.equal(failures.size, size);
  // Bounded: at most 2 entries, the oldest dropped.
  for (let i = 0; i < 3; i++) {
    const h = mutuallyIssuingChain({ spiffeId: `spiffe://td/attacker-${i}`, count: 2 });
    assert.throws(() => verifyX509SvidChain(h.certificates, bundles, t0, { failures }));
  }
  assert.equal(failures.size, 2);
  const evicted = countSignatureChecks(() =>
    verifyX509SvidChain(hostile.certificates, bundles, t0, { failures })
  );
  assert.ok(evicted.checks > 0, "the oldest entry was not dropped");
});
