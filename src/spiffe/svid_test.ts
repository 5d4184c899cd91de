import assert from "node:assert/strict";
import { X509Certificate } from "node:crypto";
import { concatDer } from "./der.ts";
import { parseX509Svid, parseX509SvidPem, SvidError } from "./svid.ts";
import { TestCa } from "./testing/test_ca.ts";

const ca = TestCa.create({ trustDomain: "td" });

Deno.test("parseX509Svid reads the ID, chain, key, hint and validity", () => {
  const inter = ca.intermediate();
  const notBefore = new Date("2026-01-01T00:00:00Z");
  const notAfter = new Date("2026-01-01T01:00:00Z");
  const s = inter.issue({
    spiffeId: "spiffe://td/robot/robot-001",
    dnsNames: ["robot-001"],
    notBefore,
    notAfter,
  });
  const svid = parseX509Svid(s.chainDer, s.keyDer, "internal");
  assert.equal(svid.id.toString(), "spiffe://td/robot/robot-001");
  assert.equal(svid.hint, "internal");
  assert.equal(svid.certificates.length, 2);
  assert.deepEqual(svid.notBefore, notBefore);
  assert.deepEqual(svid.notAfter, notAfter);
  assert.deepEqual(svid.dnsNames, ["robot-001"]);
  assert.equal(svid.certChainPem(), s.chainPem);
  assert.deepEqual(svid.certChainDer(), s.chainDer);
  assert.equal(svid.privateKeyPem(), s.keyPem);
  assert.deepEqual(svid.privateKeyDer(), s.keyDer);
  assert.equal(new X509Certificate(svid.certChainPem()).subject, "CN=robot-001");
  const again = parseX509SvidPem(svid.certChainPem(), svid.privateKeyPem());
  assert.equal(again.id.toString(), svid.id.toString());
  assert.equal(again.hint, "");
});

Deno.test("parseX509Svid refuses a key that does not match the leaf", () => {
  const a = ca.issue({ spiffeId: "spiffe://td/a" });
  const b = ca.issue({ spiffeId: "spiffe://td/b" });
  assert.throws(() => parseX509Svid(a.chainDer, b.keyDer), {
    name: "SvidError",
    message:
      "X.509 SVID private key does not match the public key of the leaf certificate spiffe://td/a",
  });
  assert.throws(() => parseX509SvidPem(a.chainPem, b.keyPem), /does not match/);
});

Deno.test("parseX509Svid enforces the X509-SVID rules with precise errors", () => {
  const cases: Array<[string, () => Uint8Array[], RegExp | string]> = [
    ["no URI SAN", () => {
      const s = ca.issue({ dnsNames: ["x"] });
      return [s.chainDer, s.keyDer];
    }, "leaf certificate has no URI SAN (expected a SPIFFE ID)"],
    [
      "two URI SANs",
      () => {
        const s = ca.issue({ uris: ["spiffe://td/a", "spiffe://td/b"] });
        return [s.chainDer, s.keyDer];
      },
      "leaf certificate has 2 URI SANs (spiffe://td/a, spiffe://td/b); an X.509 SVID has exactly one",
    ],
    [
      "URI SAN not a SPIFFE ID",
      () => {
        const s = ca.issue({ uris: ["https://td/a"] });
        return [s.chainDer, s.keyDer];
      },
      /^leaf certificate: URI SAN is not a valid SPIFFE ID: invalid SPIFFE ID "https:\/\/td\/a": scheme must be/,
    ],
    ["CA leaf", () => {
      const s = ca.issue({ spiffeId: "spiffe://td/a", isCa: true });
      return [s.chainDer, s.keyDer];
    }, "leaf certificate spiffe://td/a must not be a CA (basicConstraints cA is true)"],
    ["keyCertSign on leaf", () => {
      const s = ca.issue({
        spiffeId: "spiffe://td/a",
        keyUsage: ["digitalSignature", "keyCertSign"],
      });
      return [s.chainDer, s.keyDer];
    }, "leaf certificate spiffe://td/a must not have the keyCertSign key usage"],
    ["no digitalSignature", () => {
      const s = ca.issue({ spiffeId: "spiffe://td/a", keyUsage: ["keyEncipherment"] });
      return [s.chainDer, s.keyDer];
    }, "leaf certificate spiffe://td/a must have the digitalSignature key usage"],
    ["non-CA intermediate", () => {
      const s = ca.issue({ spiffeId: "spiffe://td/a" });
      const other = ca.issue({ spiffeId: "spiffe://td/b" });
      return [
        concatDer([new Uint8Array(s.certificate.raw), new Uint8Array(other.certificate.raw)]),
        s.keyDer,
      ];
    }, "certificate 2 of the chain of spiffe://td/a is not a CA, so it cannot sign the leaf"],
    ["truncated chain", () => {
      const s = ca.issue({ spiffeId: "spiffe://td/a" });
      return [s.chainDer.subarray(0, 100), s.keyDer];
    }, /^X\.509 SVID certificate chain: certificate 1: truncated DER/],
    [
      "empty chain",
      () => [new Uint8Array(), ca.issue({ spiffeId: "spiffe://td/a" }).keyDer],
      "X.509 SVID certificate chain is empty",
    ],
    [
      "empty key",
      () => [ca.issue({ spiffeId: "spiffe://td/a" }).chainDer, new Uint8Array()],
      "X.509 SVID private key is empty",
    ],
    [
      "garbage key",
      () => [ca.issue({ spiffeId: "spiffe://td/a" }).chainDer, new Uint8Array([1, 2, 3])],
      /^X\.509 SVID private key is not a valid PKCS#8 DER key/,
    ],
    [
      "garbage certificate",
      () => [new Uint8Array([0x30, 0x03, 1, 2, 3]), ca.issue({ spiffeId: "spiffe://td/a" }).keyDer],
      /^X\.509 SVID certificate chain: certificate 1 cannot be parsed/,
    ],
  ];
  for (const [name, make, expected] of cases) {
    const [chain, key] = make();
    assert.throws(() => parseX509Svid(chain, key), (err: unknown) => {
      assert.ok(err instanceof SvidError, `${name}: ${err}`);
      if (typeof expected === "string") assert.equal(err.message, expected, name);
      else assert.match(err.message, expected, name);
      return true;
    });
  }
});

Deno.test("parseX509SvidPem reports wrong PEM blocks", () => {
  const s = ca.issue({ spiffeId: "spiffe://td/a" });
  assert.throws(() => parseX509SvidPem("not pem", s.keyPem), {
    message: "X.509 SVID certificate PEM: no PEM block found",
  });
  assert.throws(() => parseX509SvidPem(s.keyPem, s.keyPem), {
    message: "X.509 SVID certificate PEM: block 1 is PRIVATE KEY, expected CERTIFICATE",
  });
  assert.throws(() => parseX509SvidPem(s.chainPem, s.keyPem + s.keyPem), {
    message: "X.509 SVID key PEM: expected 1 key, found 2 blocks",
  });
});
