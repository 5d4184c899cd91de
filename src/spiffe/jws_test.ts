import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { generateKeyPairSync, sign } from "node:crypto";
import { X509Bundle, X509BundleSet } from "./bundle.ts";
import {
  type FlattenedJws,
  JwsError,
  MAX_X5C_CERTS,
  parseJws,
  signJws,
  verifyJws,
  X5cChainCache,
} from "./jws.ts";
import { parseX509SvidPem } from "./svid.ts";
import { countSignatureChecks, mutuallyIssuingChain, TestCa } from "./testing/test_ca.ts";

const TD = "example.org";
const ID = `spiffe://${TD}/fleet-server`;

function setup(opts: { intermediate?: boolean } = {}) {
  const root = TestCa.create({ trustDomain: TD });
  const ca = opts.intermediate ? root.intermediate() : root;
  const issued = ca.issue({ spiffeId: ID });
  const svid = parseX509SvidPem(issued.chainPem, issued.keyPem);
  const bundles = new X509BundleSet([X509Bundle.fromPem(TD, root.rootPem)]);
  return { root, ca, issued, svid, bundles };
}

const bytes = (s: string) => new TextEncoder().encode(s);

function tamper(jws: FlattenedJws, patch: Partial<FlattenedJws>): unknown {
  return { ...jws, ...patch };
}

function rejects(fn: () => unknown, re: RegExp) {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof JwsError, `expected JwsError, got ${err}`);
    assert.match((err as Error).message, re);
    return true;
  });
}

Deno.test("jws: ES256 round trip returns the exact signed bytes and the signer", () => {
  const { svid, bundles } = setup();
  // Odd whitespace, key order and non-ASCII survive untouched: nothing is re-serialized.
  const payload = bytes('{ "b":1,  "a" : "é\\u0000" }\n');
  const jws = signJws(payload, svid, { typ: "k8s4r-task" });
  const parsed = parseJws(JSON.parse(JSON.stringify(jws)));
  assert.equal(parsed.header.alg, "ES256");
  assert.equal(parsed.header.typ, "k8s4r-task");
  assert.equal(parsed.header.x5c.length, 1);
  const v = verifyJws(parsed, bundles);
  assert.deepEqual(v.payload, payload);
  assert.equal(v.signer.toString(), ID);
  assert.equal(Buffer.from(parsed.signature).byteLength, 64);
});

Deno.test("jws: a chain through an intermediate verifies; without it, it does not", () => {
  const { svid, bundles } = setup({ intermediate: true });
  const jws = signJws(bytes("x"), svid);
  const parsed = parseJws(jws);
  assert.equal(parsed.header.x5c.length, 2);
  assert.equal(verifyJws(parsed, bundles).signer.toString(), ID);
  // The same signature with the leaf alone: no path to the root.
  const h = JSON.parse(Buffer.from(jws.protected, "base64url").toString());
  h.x5c = h.x5c.slice(0, 1);
  const prot = Buffer.from(JSON.stringify(h)).toString("base64url");
  const resigned = sign("sha256", bytes(`${prot}.${jws.payload}`), {
    key: svid.privateKey,
    dsaEncoding: "ieee-p1363",
  });
  const leafOnly = { ...jws, protected: prot, signature: resigned.toString("base64url") };
  rejects(() => verifyJws(parseJws(leafOnly), bundles), /chain does not verify: .*not issued/);
});

Deno.test("jws: tampered payload, header or signature is refused", () => {
  const { svid, bundles } = setup();
  const jws = signJws(bytes('{"command":["echo"]}'), svid, { typ: "k8s4r-task" });
  const otherPayload = Buffer.from('{"command":["rm"]}').toString("base64url");
  rejects(
    () => verifyJws(parseJws(tamper(jws, { payload: otherPayload })), bundles),
    /signature does not verify/,
  );
  // Same chain, typ changed: the header is signed too.
  const h = JSON.parse(Buffer.from(jws.protected, "base64url").toString());
  h.typ = "k8s4r-cancel";
  const prot = Buffer.from(JSON.stringify(h)).toString("base64url");
  rejects(
    () => verifyJws(parseJws(tamper(jws, { protected: prot })), bundles),
    /signature does not verify/,
  );
  // A signature by another key, with the real signer's chain in the header.
  const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const forged = sign("sha256", bytes(`${jws.protected}.${otherPayload}`), {
    key: privateKey,
    dsaEncoding: "ieee-p1363",
  });
  rejects(
    () =>
      verifyJws(
        parseJws(tamper(jws, { payload: otherPayload, signature: forged.toString("base64url") })),
        bundles,
      ),
    /signature does not verify with the key of spiffe:\/\/example.org\/fleet-server/,
  );
  // Positive control: the untouched JWS verifies.
  assert.equal(verifyJws(parseJws(jws), bundles).signer.toString(), ID);
});

Deno.test("jws: a signer from another CA, an expired signer, or no bundle is refused", () => {
  const { bundles } = setup();
  const foreign = TestCa.create({ trustDomain: TD }).issue({ spiffeId: ID });
  const fsvid = parseX509SvidPem(foreign.chainPem, foreign.keyPem);
  rejects(
    () => verifyJws(parseJws(signJws(bytes("x"), fsvid)), bundles),
    /chain does not verify: leaf certificate spiffe:\/\/example.org\/fleet-server .* not issued/,
  );
  const { root, svid } = setup();
  const b = new X509BundleSet([X509Bundle.fromPem(TD, root.rootPem)]);
  const jws = parseJws(signJws(bytes("x"), svid));
  rejects(
    () => verifyJws(jws, b, { now: new Date(Date.now() + 2 * 3600_000) }),
    /chain does not verify: leaf certificate .* expired/,
  );
  rejects(() => verifyJws(jws, new X509BundleSet()), /no X.509 bundle for trust domain/);
});

Deno.test("jws: the algorithm is the key's: ES384 on P-384; none, HS256, mismatches, RSA refused", () => {
  const root = TestCa.create({ trustDomain: TD });
  const bundles = new X509BundleSet([X509Bundle.fromPem(TD, root.rootPem)]);
  const p384 = root.issue({
    spiffeId: ID,
    key: generateKeyPairSync("ec", { namedCurve: "P-384" }).privateKey,
  });
  const s384 = parseX509SvidPem(p384.chainPem, p384.keyPem);
  const jws = signJws(bytes("x"), s384);
  const parsed = parseJws(jws);
  assert.equal(parsed.header.alg, "ES384");
  assert.equal(parsed.signature.byteLength, 96);
  assert.equal(verifyJws(parsed, bundles).signer.toString(), ID);

  const withHeader = (patch: Record<string, unknown>) => {
    const h = JSON.parse(Buffer.from(jws.protected, "base64url").toString());
    return {
      ...jws,
      protected: Buffer.from(JSON.stringify({ ...h, ...patch })).toString("base64url"),
    };
  };
  rejects(() => parseJws(withHeader({ alg: "none" })), /alg "none" is not accepted/);
  rejects(() => parseJws(withHeader({ alg: "HS256" })), /alg "HS256" is not accepted/);
  rejects(() => parseJws(withHeader({ alg: "RS256" })), /alg "RS256" is not accepted/);
  // ES256 claimed for a P-384 key: refused before the signature is even looked at.
  rejects(
    () => verifyJws(parseJws(withHeader({ alg: "ES256" })), bundles),
    /alg ES256 does not match the signer's key \(ES384/,
  );
  const rsa = root.issue({
    spiffeId: ID,
    key: generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey,
  });
  const srsa = parseX509SvidPem(rsa.chainPem, rsa.keyPem);
  rejects(() => signJws(bytes("x"), srsa), /is rsa: only EC P-256 \(ES256\) and P-384/);
});

Deno.test("jws: structure errors name what is wrong", () => {
  const { svid } = setup();
  const jws = signJws(bytes("x"), svid);
  rejects(() => parseJws("x"), /expected a JWS object/);
  rejects(() => parseJws({ payload: "x" }), /expected a JWS object/);
  rejects(() => parseJws({ ...jws, header: { kid: "k" } }), /unexpected JWS member "header"/);
  rejects(() => parseJws({ ...jws, payload: "a+b/" }), /JWS payload: expected base64url/);
  rejects(() => parseJws({ ...jws, protected: "!!" }), /protected header: expected base64url/);
  rejects(
    () => parseJws({ ...jws, protected: Buffer.from("[1]").toString("base64url") }),
    /not a JSON object/,
  );
  const h = JSON.parse(Buffer.from(jws.protected, "base64url").toString());
  const enc = (o: unknown) => Buffer.from(JSON.stringify(o)).toString("base64url");
  rejects(() => parseJws({ ...jws, protected: enc({ ...h, crit: ["b64"] }) }), /crit/);
  rejects(() => parseJws({ ...jws, protected: enc({ ...h, x5c: [] }) }), /x5c: expected 1\.\.8/);
  rejects(
    () =>
      parseJws({
        ...jws,
        protected: enc({ ...h, x5c: Array(MAX_X5C_CERTS + 1).fill(h.x5c[0]) }),
      }),
    /x5c: expected 1\.\.8 certificates .* got 9/,
  );
  rejects(() => parseJws({ ...jws, protected: enc({ ...h, x5c: ["a_b"] }) }), /x5c\[0\]/);
  rejects(
    () =>
      verifyJws(
        parseJws({ ...jws, protected: enc({ ...h, x5c: ["AAAA"] }) }),
        new X509BundleSet(),
      ),
    /x5c\[0\] is not an X.509 certificate/,
  );
});

Deno.test("jws: the chain cache follows the bundle (CA rotation) and validity", () => {
  const { root, svid } = setup();
  const cache = new X5cChainCache();
  let bundles = new X509BundleSet([X509Bundle.fromPem(TD, root.rootPem)]);
  const source = { getX509BundleForTrustDomain: (td: string) => bundles.get(td) };
  const jws = parseJws(signJws(bytes("x"), svid));
  assert.equal(verifyJws(jws, source, { cache }).signer.toString(), ID);
  assert.equal(cache.size, 1);
  assert.equal(verifyJws(jws, source, { cache }).signer.toString(), ID); // hit
  // The bundle now trusts another CA only: the cached chain is not used, the JWS is refused.
  const other = TestCa.create({ trustDomain: TD });
  bundles = new X509BundleSet([X509Bundle.fromPem(TD, other.rootPem)]);
  rejects(() => verifyJws(jws, source, { cache }), /chain does not verify/);
  // A rotation that keeps the old CA next to the new one: verified again, accepted.
  bundles = new X509BundleSet([X509Bundle.fromPem(TD, root.rootPem + other.rootPem)]);
  assert.equal(verifyJws(jws, source, { cache }).signer.toString(), ID);
  // Past the leaf's validity, a hit is not enough.
  rejects(
    () => verifyJws(jws, source, { cache, now: new Date(Date.now() + 2 * 3600_000) }),
    /expired/,
  );
});

Deno.test("jws: an x5c of 7 CAs that all issue each other is refused within 64 signature checks, then from the cache", () => {
  const { bundles, svid } = setup();
  const hostile = mutuallyIssuingChain({ spiffeId: ID, count: 7 });
  const signer = parseX509SvidPem(hostile.chainPem, hostile.keyPem);
  assert.equal(signer.certificates.length, 8);
  const jws = parseJws(signJws(bytes("task"), signer));
  const cache = new X5cChainCache();
  const first = countSignatureChecks(() => verifyJws(jws, bundles, { cache }));
  assert.ok(first.error instanceof JwsError, `not refused: ${String(first.error ?? first.result)}`);
  assert.match(
    first.error.message,
    /^the signer's chain does not verify: leaf certificate spiffe:\/\/example\.org\/fleet-server \(issuer "O=SPIFFE, CN=mutual issuer"\) is not issued under the X\.509 bundle/,
  );
  assert.ok(first.checks <= 64, `${first.checks} signature checks`);
  // Sent again (a flood of the same message): the same refusal, no signature check.
  const again = countSignatureChecks(() => verifyJws(jws, bundles, { cache }));
  assert.ok(again.error instanceof JwsError);
  assert.equal(again.error.message, first.error.message);
  assert.equal(again.checks, 0);
  assert.equal(cache.size, 0, "a refused chain is not cached as verified");
  // Control: the real signer's JWS with the same cache verifies.
  const ok = countSignatureChecks(() =>
    verifyJws(parseJws(signJws(bytes("task"), svid)), bundles, { cache })
  );
  assert.equal(ok.result?.signer.toString(), ID, String(ok.error));
});
