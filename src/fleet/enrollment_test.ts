import assert from "node:assert/strict";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import { testEnrollment } from "./testing/enrollment.ts";
import {
  checkEnrollmentUsable,
  type Enrollment,
  EnrollmentError,
  enrollmentRecord,
  parseEnrollment,
  readEnrollmentFile,
  renderEnrollment,
  writeEnrollmentFile,
} from "./enrollment.ts";

const TD = "k8s4r.example.org";
const TOKEN = "0f5a2c1e-4b7d-4e1a-9c3b-7d2e6f8a9b10";
const spire = TestCa.create({ trustDomain: TD });
const factory = TestCa.create({ trustDomain: "factory.invalid", commonName: "k8s4r factory CA" });

function joinToken(over: Partial<Enrollment> = {}): Enrollment {
  return testEnrollment({
    trustDomain: TD,
    trustBundle: spire.rootPem,
    createdAt: new Date("2026-12-01T10:00:00.000Z"),
    attestation: { type: "join_token", token: TOKEN, expiresAt: new Date("2026-12-01T10:10:00Z") },
    ...over,
  });
}

function x509pop(): Enrollment {
  const cert = factory.issue({
    commonName: "robot-007",
    keyUsage: ["digitalSignature"],
    ttlSeconds: 86400,
  });
  return joinToken({
    attestation: {
      type: "x509pop",
      certificate: cert.chainPem,
      expiresAt: new Date(cert.certificate.validTo),
    },
  });
}

/** The rendered text of a good enrollment, changed by `edit` on its JSON object. */
// deno-lint-ignore no-explicit-any
type Json = Record<string, any>;
function edited(e: Enrollment, edit: (o: Json) => void): string {
  const o = JSON.parse(renderEnrollment(e)) as Json;
  edit(o);
  return JSON.stringify(o, null, 2);
}

Deno.test("enrollment: render and parse round trip, join token and x509pop", () => {
  for (const e of [joinToken(), x509pop()]) {
    const text = renderEnrollment(e);
    assert.match(text, /"format": "k8s4r-enrollment"/);
    assert.match(text, /"version": 1/);
    assert.deepEqual(parseEnrollment(text, "f.json"), e);
  }
});

Deno.test("enrollment: writeEnrollmentFile is 0600 (also over an existing 0644 file)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-enroll-" });
  try {
    const f = `${dir}/robot-007.enroll.json`;
    await Deno.writeTextFile(f, "old", { mode: 0o644 });
    await writeEnrollmentFile(f, joinToken());
    assert.equal((await Deno.stat(f)).mode! & 0o777, 0o600);
    assert.deepEqual(await readEnrollmentFile(f), joinToken());
    await assert.rejects(
      readEnrollmentFile(`${dir}/missing.json`),
      /missing\.json: file not found/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("enrollment: the token never lands in a file someone opened before (written to a new 0600 file, renamed)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-enroll-" });
  try {
    // Someone made the output file in advance, 0644, and keeps it open to read.
    const f = `${dir}/robot-007.enroll.json`;
    await Deno.writeTextFile(f, "", { mode: 0o644 });
    const spy = await Deno.open(f, { read: true });
    try {
      await writeEnrollmentFile(f, joinToken());
      const seen = new TextDecoder().decode(await readAll(spy));
      assert.ok(!seen.includes(TOKEN), "the join token was written into the pre-opened file");
    } finally {
      spy.close();
    }
    // The control: the file at that path holds the token, and was 0600 from its creation.
    assert.ok((await Deno.readTextFile(f)).includes(TOKEN));
    assert.equal((await Deno.stat(f)).mode! & 0o777, 0o600);
    assert.deepEqual(
      [...Deno.readDirSync(dir)].map((e) => e.name),
      ["robot-007.enroll.json"],
      "a temp file was left behind",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

async function readAll(f: Deno.FsFile): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  const buf = new Uint8Array(64 * 1024);
  for (let n = await f.read(buf); n !== null; n = await f.read(buf)) chunks.push(buf.slice(0, n));
  const out = new Uint8Array(chunks.reduce((a, c) => a + c.length, 0));
  let off = 0;
  for (const c of chunks) (out.set(c, off), off += c.length);
  return out;
}

Deno.test("enrollment: each bad key is one line naming the file, line, key, expectation and the control-host command", () => {
  const good = joinToken();
  const cases: [string, RegExp][] = [
    ["{", /^f\.json:1: expected a k8s4r enrollment file \(JSON\), got invalid JSON/],
    ["[]", /^f\.json: expected a JSON object with "format": "k8s4r-enrollment", got a list/],
    [edited(good, (o) => (o.format = "other")), /^f\.json:2: format: expected "k8s4r-enrollment"/],
    [
      edited(good, (o) => (o.version = 2)),
      /^f\.json:3: version: expected version 1, got 2: written by a newer k8s4r/,
    ],
    [
      edited(good, (o) => (o.robotId = "Robot_7")),
      /^f\.json:4: robotId: expected \[a-z0-9\]\[a-z0-9-\]\{0,62\}, got "Robot_7"/,
    ],
    [
      edited(good, (o) => (o.robotId = "k8s4r-server")),
      /robotId: expected a robot id, got the reserved name "k8s4r-server"/,
    ],
    [edited(good, (o) => (o.robotId = "broker")), /reserved name "broker"/],
    [
      edited(good, (o) => (o.trustDomain = "Bad Domain")),
      /:5: trustDomain: expected lowercase letters/,
    ],
    [
      edited(good, (o) => (o.spireServerAddress = "10.203.0.1")),
      /:6: spireServerAddress: expected host:port like 10\.203\.0\.1:8081, got "10\.203\.0\.1"/,
    ],
    [
      edited(good, (o) => (o.brokerUrl = "mqtt://10.203.0.1:1883")),
      /:7: brokerUrl: mqtt:\/\/ is refused: robots reach the broker only over mTLS/,
    ],
    [
      edited(good, (o) => (o.brokerSpiffeId = "spiffe://other.org/mqtt-broker")),
      /:8: brokerSpiffeId: expected a SPIFFE ID in trust domain k8s4r\.example\.org/,
    ],
    [
      edited(good, (o) => delete o.fleetServerSpiffeId),
      /fleetServerSpiffeId: expected a SPIFFE ID like spiffe:\/\/k8s4r\.example\.org\/\.\.\., got nothing/,
    ],
    [edited(good, (o) => (o.trustBundle = "nope")), /trustBundle: expected PEM certificates/],
    [
      edited(good, (o) => (o.trustBundle = factory.issue({ commonName: "x" }).certPem)),
      /trustBundle: expected CA certificates, certificate 1 is not a CA/,
    ],
    [
      edited(good, (o) => (o.createdAt = "yesterday")),
      /createdAt: expected an ISO 8601 time like 2026-12-01T10:00:00Z, got "yesterday"/,
    ],
    [edited(good, (o) => (o.extra = 1)), /extra: unknown key; expected one of format, version/],
    [
      edited(good, (o) => (o.attestation = "token")),
      /attestation: expected \{"type": "join_token" \| "x509pop", \.\.\.\}, got "token"/,
    ],
    [
      edited(good, (o) => (o.attestation.type = "tpm")),
      /attestation\.type: expected "join_token" or "x509pop", got "tpm"/,
    ],
    [
      edited(good, (o) => (o.attestation.token = "has space")),
      /attestation\.token: expected the join token \(1\.\.512 printable characters, no spaces\), got a string of 9 characters/,
    ],
    [
      edited(good, (o) => (o.attestation.certificate = "x")),
      /attestation\.certificate: unknown key for join_token/,
    ],
    [
      edited(good, (o) => (o.attestation.expiresAt = 5)),
      /attestation\.expiresAt: expected an ISO 8601 time/,
    ],
  ];
  for (const [text, re] of cases) {
    let err: unknown;
    try {
      parseEnrollment(text, "f.json");
    } catch (e) {
      err = e;
    }
    assert.ok(err instanceof EnrollmentError, `no EnrollmentError for ${re}`);
    const msg = (err as Error).message;
    assert.match(msg, re);
    assert.ok(!msg.includes("\n"), `two lines: ${msg}`);
    assert.match(
      msg,
      /; on the control host run: k8s4r robot add (robot-007|ROBOT_ID) --out (robot-007|ROBOT_ID)\.enroll\.json$/,
      msg,
    );
    assert.equal((err as EnrollmentError).exitCode, 2);
    assert.ok(!msg.includes(TOKEN), "the token is in an error message");
  }
});

Deno.test("enrollment: x509pop certificate checks (CN, key usage, not a CA, no private key, expiresAt)", () => {
  const good = x509pop();
  const hint =
    /on the control host run: k8s4r robot add robot-007 --attestation x509pop --csr robot-007\.csr --out robot-007\.enroll\.json$/;
  const bad = (cert: { chainPem: string; certificate: { validTo: string } }) =>
    edited(good, (o) => {
      o.attestation.certificate = cert.chainPem;
      o.attestation.expiresAt = new Date(cert.certificate.validTo).toISOString();
    });
  const cases: [string, RegExp][] = [
    [
      bad(factory.issue({ commonName: "robot-008", keyUsage: ["digitalSignature"] })),
      /expected a certificate for CN=robot-007, got CN=robot-008/,
    ],
    [
      bad(factory.issue({ commonName: "robot-007", keyUsage: ["keyEncipherment"] })),
      /keyUsage digitalSignature/,
    ],
    [
      bad(factory.issue({ commonName: "robot-007", isCa: true })),
      /expected the robot's own certificate first, got a CA certificate/,
    ],
    [
      edited(good, (o) => (o.attestation.certificate += factory.issue({}).keyPem)),
      /expected only CERTIFICATE blocks, got PRIVATE KEY \(block 2\): a private key must never be in this file/,
    ],
    [
      edited(good, (o) => (o.attestation.expiresAt = "2031-01-01T00:00:00Z")),
      /attestation\.expiresAt: expected the certificate's notAfter/,
    ],
    [
      edited(good, (o) => (o.attestation.token = TOKEN)),
      /attestation\.token: unknown key for x509pop/,
    ],
  ];
  for (const [text, re] of cases) {
    assert.throws(() => parseEnrollment(text, "f.json"), (e) => {
      assert.ok(e instanceof EnrollmentError);
      assert.match(e.message, re);
      assert.match(e.message, hint);
      return true;
    });
  }
});

Deno.test("enrollment: an expired token or certificate says exactly what to run on the control host", () => {
  const e = joinToken();
  const text = renderEnrollment(e);
  // Positive control: usable before it expires.
  checkEnrollmentUsable(e, "f.json", text, Date.parse("2026-12-01T10:05:00Z"));
  assert.throws(
    () => checkEnrollmentUsable(e, "f.json", text, Date.parse("2026-12-01T10:13:00Z")),
    (err) => {
      assert.ok(err instanceof EnrollmentError);
      assert.equal(
        err.message,
        "f.json:15: attestation.expiresAt: the join token expired at 2026-12-01T10:10:00.000Z (3m ago); join tokens are single use and short-lived; on the control host run: k8s4r robot add robot-007 --out robot-007.enroll.json",
      );
      assert.equal(err.hint, "then, on this robot: k8s4r agent --enroll robot-007.enroll.json");
      return true;
    },
  );
  const p = x509pop();
  const a = p.attestation;
  assert.throws(
    () => checkEnrollmentUsable(p, "f.json", undefined, a.expiresAt.getTime() + 86400_000),
    /the x509pop certificate expired at .* \(24h ago\); on the control host run: k8s4r robot add robot-007 --attestation x509pop --csr robot-007\.csr/,
  );
  // Written "in the future": this host's clock is behind.
  assert.throws(
    () => checkEnrollmentUsable(e, "f.json", text, Date.parse("2026-12-01T07:00:00Z")),
    /createdAt: the file was written at 2026-12-01T10:00:00\.000Z, 3h after this host's clock .*: the clock is behind/,
  );
});

Deno.test("enrollment: the robot's record has no token and parses as a record", () => {
  const rec = enrollmentRecord(joinToken(), new Date("2026-12-01T10:01:00Z"));
  const text = JSON.stringify(rec, null, 2);
  assert.ok(!text.includes(TOKEN));
  const back = parseEnrollment(text, "enrollment.json", { record: true });
  assert.equal(back.attestation.type, "join_token");
  assert.equal(back.attestation.type === "join_token" && back.attestation.token, undefined);
  // A full enrollment file is not a record (its token belongs in join-token), and vice versa.
  assert.throws(
    () => parseEnrollment(renderEnrollment(joinToken()), "r", { record: true }),
    /expected no token/,
  );
  assert.throws(() => parseEnrollment(text, "f.json"), /enrolledAt: unknown key/);
});

Deno.test("enrollment: a robot id the fleet reserves (localhost, the CN of its own SVIDs) is refused", () => {
  const text = edited(joinToken(), (o) => (o.robotId = "localhost"));
  assert.throws(() => parseEnrollment(text, "e.json"), /robotId.*reserved/);
});
