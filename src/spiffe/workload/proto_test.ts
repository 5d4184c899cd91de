import assert from "node:assert/strict";
import {
  decodeEmpty,
  decodeJwtBundlesResponse,
  decodeJwtSvidRequest,
  decodeJwtSvidResponse,
  decodeValidateJwtSvidRequest,
  decodeValidateJwtSvidResponse,
  decodeX509BundlesResponse,
  decodeX509SvidResponse,
  encodeJwtBundlesResponse,
  encodeJwtSvidRequest,
  encodeJwtSvidResponse,
  encodeValidateJwtSvidRequest,
  encodeValidateJwtSvidResponse,
  encodeX509BundlesResponse,
  encodeX509SvidResponse,
  type JsonObject,
  type JsonValue,
  MAX_DEPTH,
  MAX_ELEMENTS,
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

// ------------------------------------------------------------------------------ fuzzing

/** A small deterministic PRNG (mulberry32), so a failing case can be replayed by its seed. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const DECODERS: Record<string, (b: Uint8Array) => unknown> = {
  decodeX509SvidResponse,
  decodeX509BundlesResponse,
  decodeJwtSvidRequest,
  decodeJwtSvidResponse,
  decodeJwtBundlesResponse,
  decodeValidateJwtSvidRequest,
  decodeValidateJwtSvidResponse,
  decodeEmpty,
};

/** Bytes and string code units a decoded value retains. */
function retained(v: unknown, seen = new Set<unknown>()): number {
  if (v instanceof Uint8Array) return v.length;
  if (typeof v === "string") return v.length;
  if (v === null || typeof v !== "object" || seen.has(v)) return 0;
  seen.add(v);
  let n = 0;
  const values = v instanceof Map ? [...v.keys(), ...v.values()] : Object.values(v);
  for (const x of values) n += retained(x, seen);
  return n;
}

/** Decoding must return or throw ProtoError, and retain no more payload than it was given. */
function decodeOrProtoError(name: string, bytes: Uint8Array, label: string): void {
  let out: unknown;
  try {
    out = DECODERS[name](bytes);
  } catch (e) {
    assert.ok(e instanceof ProtoError, `${name} ${label}: threw ${e}`);
    return;
  }
  assert.ok(retained(out) <= bytes.length, `${name} ${label}: retains more than its input`);
}

function validSamples(): Uint8Array[] {
  return [
    encodeX509SvidResponse({
      svids: [{
        spiffeId: "spiffe://td/a",
        x509Svid: new Uint8Array(40).fill(1),
        x509SvidKey: new Uint8Array(20).fill(2),
        bundle: new Uint8Array(30).fill(3),
        hint: "h",
      }],
      crl: [new Uint8Array([4, 4])],
      federatedBundles: new Map([["spiffe://o", new Uint8Array([5])]]),
    }),
    encodeX509BundlesResponse({ crl: [], bundles: new Map([["spiffe://td", new Uint8Array(9)]]) }),
    encodeJwtSvidRequest({ audience: ["a", "b"], spiffeId: "spiffe://td/x" }),
    encodeJwtSvidResponse({ svids: [{ spiffeId: "spiffe://td/a", svid: "e.y.z", hint: "" }] }),
    encodeJwtBundlesResponse({ bundles: new Map([["spiffe://td", new Uint8Array([123, 125])]]) }),
    encodeValidateJwtSvidRequest({ audience: "mqtt", svid: "e.y.z" }),
    encodeValidateJwtSvidResponse({
      spiffeId: "spiffe://td/a",
      claims: { aud: ["x"], n: 1.5, ok: true, none: null, o: { deep: ["y", { z: 1 }] } },
    }),
  ];
}

Deno.test("fuzz: random bytes give a value or a ProtoError, for every decoder", () => {
  const rnd = prng(20261201);
  // Biased towards bytes that look like protobuf (small tags, short lengths).
  const byte = () =>
    rnd() < 0.6 ? [0x0a, 0x12, 0x1a, 0x08, 0x11, 0x15, 0, 1, 2, 3][Math.floor(rnd() * 10)] : Math
      .floor(rnd() * 256);
  for (const name of Object.keys(DECODERS)) {
    for (let i = 0; i < 3000; i++) {
      const bytes = Uint8Array.from({ length: Math.floor(rnd() * 96) }, byte);
      decodeOrProtoError(name, bytes, `random case ${i}`);
    }
  }
});

Deno.test("fuzz: truncated and mutated valid messages give a value or a ProtoError", () => {
  const rnd = prng(42);
  for (const sample of validSamples()) {
    for (const name of Object.keys(DECODERS)) {
      for (let n = 0; n <= sample.length; n++) {
        decodeOrProtoError(name, sample.subarray(0, n), `truncated to ${n}`);
      }
      for (let i = 0; i < 300; i++) {
        const m = sample.slice();
        for (let k = 1 + Math.floor(rnd() * 3); k > 0; k--) {
          m[Math.floor(rnd() * m.length)] = Math.floor(rnd() * 256);
        }
        decodeOrProtoError(name, m, `mutation ${i}`);
      }
    }
  }
});

Deno.test("limits: deep nesting, huge lengths and element floods are ProtoErrors", () => {
  // 2,000 nested Values: a ProtoError at depth 64, not a stack overflow.
  let v = new ProtoWriter().string(3, "leaf").finish();
  for (let i = 0; i < 2_000; i++) {
    const entry = new ProtoWriter().string(1, "k").message(2, v).finish();
    v = new ProtoWriter().message(5, new ProtoWriter().message(1, entry).finish()).finish();
  }
  const deep = new ProtoWriter().message(
    2,
    new ProtoWriter().message(1, new ProtoWriter().string(1, "k").message(2, v).finish()).finish(),
  ).finish();
  assert.throws(
    () => decodeValidateJwtSvidResponse(deep),
    (e: unknown) => e instanceof ProtoError && /nesting deeper than 64/.test(e.message),
  );
  // Positive control: 30 levels decode.
  let ok: JsonValue = "leaf";
  for (let i = 0; i < 30; i++) ok = { k: ok };
  assert.deepEqual(
    decodeValidateJwtSvidResponse(
      encodeValidateJwtSvidResponse({ spiffeId: "", claims: ok as JsonObject }),
    ).claims,
    ok,
  );

  // A declared length of 2^31 - 1 with 3 bytes behind it: refused, nothing allocated for it.
  assert.throws(
    () => decodeX509SvidResponse(new Uint8Array([0x12, 0xff, 0xff, 0xff, 0xff, 0x07, 1, 2, 3])),
    /declares 2147483647 bytes, only 3 remain/,
  );
  assert.throws(
    () =>
      readFields(new Uint8Array([0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]), "x"),
    /varint too large/,
  );
  assert.throws(
    () => readFields(new Uint8Array([0xf8, 0xff, 0xff, 0xff, 0x7f, 0]), "x"),
    /field number/,
  );

  // Element floods: MAX_ELEMENTS empty CRLs decode, one more is refused.
  const flood = (n: number) => {
    const b = new Uint8Array(2 * n);
    for (let i = 0; i < n; i++) b[2 * i] = 0x12; // field 2 (crl), length 0
    return b;
  };
  assert.equal(decodeX509SvidResponse(flood(MAX_ELEMENTS)).crl.length, MAX_ELEMENTS);
  assert.throws(
    () => decodeX509SvidResponse(flood(MAX_ELEMENTS + 1)),
    (e: unknown) => e instanceof ProtoError && /more than 100000 elements/.test(e.message),
  );
  assert.equal(MAX_DEPTH, 64);
});

Deno.test("error paths keep wire-supplied keys short", () => {
  const long = "k".repeat(5000);
  const bad = new ProtoWriter().message(
    2,
    new ProtoWriter().message(
      1,
      new ProtoWriter().string(1, long).message(2, new Uint8Array([0x12, 0x01])).finish(),
    ).finish(),
  ).finish();
  assert.throws(() => decodeValidateJwtSvidResponse(bad), (e: unknown) => {
    assert.ok(e instanceof ProtoError);
    assert.ok(e.message.length < 200, e.message);
    assert.match(e.message, /claims\."k{40}…"/);
    return true;
  });
});
