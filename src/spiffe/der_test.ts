import assert from "node:assert/strict";
import { concatDer, decodeOid, DerError, readTlv, splitDer } from "./der.ts";
import { TestCa } from "./testing/test_ca.ts";

Deno.test("splitDer splits concatenated certificates and concatDer joins them", () => {
  const ca = TestCa.create({ trustDomain: "td" });
  const inter = ca.intermediate();
  const s = inter.issue({ spiffeId: "spiffe://td/a" });
  const parts = splitDer(s.chainDer);
  assert.equal(parts.length, 2);
  assert.deepEqual(parts[0], new Uint8Array(s.certificate.raw));
  assert.deepEqual(parts[1], new Uint8Array(inter.certificate.raw));
  assert.deepEqual(concatDer(parts), s.chainDer);
});

Deno.test("splitDer reports empty, truncated and non-SEQUENCE input precisely", () => {
  const ca = TestCa.create({ trustDomain: "td" });
  const der = ca.rootDer;
  assert.throws(() => splitDer(new Uint8Array(), "bundle"), { message: "bundle is empty" });
  // Cut in the middle of the content.
  assert.throws(
    () => splitDer(der.subarray(0, der.length - 10), "bundle"),
    (err: unknown) =>
      err instanceof DerError &&
      /^bundle: certificate 1: truncated DER: element at byte 0 declares \d+ content bytes, only \d+ remain$/
        .test(err.message),
  );
  // Second certificate truncated.
  const two = concatDer([der, der.subarray(0, 3)]);
  assert.throws(() => splitDer(two, "bundle"), /bundle: certificate 2: truncated DER/);
  // Only the tag.
  assert.throws(() => splitDer(new Uint8Array([0x30]), "x"), {
    message: "x: certificate 1: truncated DER: missing length after tag 0x30 at byte 0",
  });
  // Long-form length whose bytes are missing.
  assert.throws(() => splitDer(new Uint8Array([0x30, 0x82, 0x01]), "x"), {
    message: "x: certificate 1: truncated DER: length at byte 1 needs 2 more bytes, only 1 remain",
  });
  // Garbage after a good certificate.
  assert.throws(() => splitDer(concatDer([der, new Uint8Array([0x04, 0x00])]), "x"), {
    message: `x: expected a SEQUENCE (0x30) at byte ${der.length} (certificate 2), got 0x04`,
  });
  assert.throws(() => splitDer(new Uint8Array([0x30, 0x80, 0, 0]), "x"), /indefinite length/);
  assert.throws(
    () => splitDer(new Uint8Array([0x30, 0x81, 0x05, 1, 2, 3, 4, 5]), "x"),
    /non-minimal/,
  );
});

Deno.test("readTlv and decodeOid", () => {
  const t = readTlv(new Uint8Array([0x06, 0x03, 0x55, 0x1d, 0x11]), 0);
  assert.deepEqual(t, { tag: 6, start: 0, contentStart: 2, end: 5 });
  assert.equal(decodeOid(new Uint8Array([0x55, 0x1d, 0x11])), "2.5.29.17");
  assert.equal(
    decodeOid(new Uint8Array([0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02])),
    "1.2.840.10045.4.3.2",
  );
  assert.throws(() => decodeOid(new Uint8Array([0x2a, 0x86])), /truncated OBJECT IDENTIFIER/);
});
