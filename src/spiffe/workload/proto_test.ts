import assert from "node:assert/strict";
import {
  decodeJwtSvidRequest,
  decodeValidateJwtSvidResponse,
  decodeX509BundlesResponse,
  decodeX509SvidResponse,
  encodeJwtSvidRequest,
  encodeValidateJwtSvidResponse,
  encodeX509BundlesResponse,
  encodeX509SvidResponse,
  ProtoError,
  ProtoWriter,
  readFields,
} from "./proto.ts";

Deno.test("X509SVIDResponse round-trips, maps included", () => {
  const msg = {
    svids: [
      {
        spiffeId: "spiffe://td/a",
        x509Svid: new Uint8Array([1, 2, 3]),
        x509SvidKey: new Uint8Array(300).fill(7), // multi-byte length varint
        bundle: new Uint8Array([9]),
        hint: "internal",
      },
      {
        spiffeId: "spiffe://td/b",
        x509Svid: new Uint8Array([4]),
        x509SvidKey: new Uint8Array([5]),
        bundle: new Uint8Array(),
        hint: "",
      },
    ],
    crl: [new Uint8Array([8])],
    federatedBundles: new Map([["spiffe://other.org", new Uint8Array([6, 6])]]),
  };
  assert.deepEqual(decodeX509SvidResponse(encodeX509SvidResponse(msg)), msg);
  const b = { crl: [], bundles: new Map([["spiffe://td", new Uint8Array([1])]]) };
  assert.deepEqual(decodeX509BundlesResponse(encodeX509BundlesResponse(b)), b);
});

Deno.test("known bytes: JWTSVIDRequest matches the protobuf wire format", () => {
  const bytes = encodeJwtSvidRequest({ audience: ["a", "b"], spiffeId: "s" });
  assert.deepEqual([...bytes], [0x0a, 1, 0x61, 0x0a, 1, 0x62, 0x12, 1, 0x73]);
  assert.deepEqual(decodeJwtSvidRequest(bytes), { audience: ["a", "b"], spiffeId: "s" });
});

Deno.test("unknown fields are skipped", () => {
  const bytes = new ProtoWriter().uint(15, 300).string(1, "spiffe://td/x").double(16, 1.5).finish();
  const res = decodeValidateJwtSvidResponse(bytes);
  assert.equal(res.spiffeId, "spiffe://td/x");
});

Deno.test("google.protobuf.Struct claims round-trip", () => {
  const claims = {
    sub: "spiffe://td/a",
    aud: ["x", "y"],
    exp: 1700000000,
    nested: { ok: true, none: null, n: -2.5 },
  };
  const res = decodeValidateJwtSvidResponse(
    encodeValidateJwtSvidResponse({ spiffeId: "spiffe://td/a", claims }),
  );
  assert.deepEqual(res.claims, claims);
  const evil = decodeValidateJwtSvidResponse(
    encodeValidateJwtSvidResponse({ spiffeId: "", claims: JSON.parse('{"__proto__": {"x": 1}}') }),
  );
  assert.equal(Object.getPrototypeOf(evil.claims), Object.prototype);
  assert.deepEqual(Object.keys(evil.claims), ["__proto__"]);
});

Deno.test("malformed input gives ProtoError naming the problem", () => {
  const cases: Array<[Uint8Array, RegExp]> = [
    [
      new Uint8Array([0x0a, 0x05, 1]),
      /X509SVIDResponse: field 1 at byte 0 declares 5 bytes, only 1 remain/,
    ],
    [new Uint8Array([0x08, 0x80]), /truncated varint/],
    [new Uint8Array([0x0b]), /unsupported wire type 3/],
    [new Uint8Array([0x00, 0x00]), /field number 0/],
    [new Uint8Array([0x08, 0x01]), /field 1 \(svids\) has wire type 0, expected 2/],
    [
      new Uint8Array([0x0a, 0x02, 0x0a, 0x05]),
      /X509SVIDResponse\.svids\[0\]: field 1 at byte 0 declares 5 bytes/,
    ],
    [new Uint8Array([0x0a, 0x03, 0x0a, 0x01, 0xff]), /spiffe_id\) is not valid UTF-8/],
  ];
  for (const [bytes, re] of cases) {
    assert.throws(
      () => decodeX509SvidResponse(bytes),
      (e: unknown) => e instanceof ProtoError && re.test(e.message),
    );
  }
  assert.throws(
    () => readFields(new Uint8Array(11).fill(0xff), "x"),
    /varint longer than 10 bytes/,
  );
});
