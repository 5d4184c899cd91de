import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { createCsr, CsrError, csrToPem, parseCsrPem, samePublicKey } from "./csr.ts";
import { encodePem } from "./pem.ts";

Deno.test("createCsr/parseCsrPem: EC P-256, P-384 and RSA round trip with a checked signature", () => {
  for (
    const key of [
      generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey,
      generateKeyPairSync("ec", { namedCurve: "P-384" }).privateKey,
      generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey,
    ]
  ) {
    const pem = csrToPem(createCsr({ commonName: "robot-007", key }));
    assert.match(pem, /^-----BEGIN CERTIFICATE REQUEST-----\n/);
    const csr = parseCsrPem(pem);
    assert.equal(csr.commonName, "robot-007");
    assert.ok(samePublicKey(csr.publicKey, key));
    assert.match(csr.keyDescription, /^(EC P-256|EC P-384|RSA 2048)$/);
  }
});

Deno.test("parseCsrPem refuses a tampered, foreign-key or malformed CSR, saying why", () => {
  const key = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
  const der = createCsr({ commonName: "robot-007", key });
  // Positive control: the untouched CSR parses.
  assert.equal(parseCsrPem(csrToPem(der)).commonName, "robot-007");
  // Change one letter of the CN: the signature no longer covers the request.
  const tampered = new Uint8Array(der);
  const at = new TextDecoder("latin1").decode(der).indexOf("robot-007");
  tampered[at + 8] = "8".charCodeAt(0);
  assert.throws(() => parseCsrPem(csrToPem(tampered)), /signature does not verify/);
  assert.throws(
    () => parseCsrPem("no pem here"),
    (e) => e instanceof CsrError && /no PEM block/.test(e.message),
  );
  assert.throws(
    () => parseCsrPem(encodePem("CERTIFICATE REQUEST", new Uint8Array([0x30, 0x03, 1, 2]))),
    /malformed DER|expected/,
  );
  const ed = generateKeyPairSync("ed25519").privateKey;
  assert.throws(() => createCsr({ commonName: "x", key: ed }), /unsupported key type ed25519/);
  const small = generateKeyPairSync("rsa", { modulusLength: 1024 }).privateKey;
  assert.throws(
    () => parseCsrPem(csrToPem(createCsr({ commonName: "x", key: small }))),
    /at least 2048/,
  );
  assert.throws(() => parseCsrPem(csrToPem(der) + csrToPem(der)), /exactly one/);
});
