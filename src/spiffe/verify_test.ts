import assert from "node:assert/strict";
import { X509Bundle, X509BundleSet } from "./bundle.ts";
import { TestCa } from "./testing/test_ca.ts";
import { VerificationError, verifyX509Svid, verifyX509SvidChain } from "./verify.ts";

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
