import assert from "node:assert/strict";
import { createPublicKey, generateKeyPairSync, X509Certificate } from "node:crypto";
import { parseEnrollment, renderEnrollment } from "../fleet/enrollment.ts";
import { createCsr, csrToPem } from "../spiffe/csr.ts";
import { parseCertDer } from "../spiffe/x509.ts";
import { ensureFactoryCa, FactoryCa, factoryCaFiles } from "./factory_ca.ts";

Deno.test("factory CA: created once (key 0600), signs a robot's CSR into an x509pop certificate", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const files = factoryCaFiles(`${dir}/fca`);
    assert.equal(await ensureFactoryCa(files), "created");
    assert.equal(await ensureFactoryCa(files), "kept");
    assert.equal((await Deno.stat(files.key)).mode! & 0o777, 0o600);
    assert.equal((await Deno.stat(`${dir}/fca`)).mode! & 0o777, 0o700);
    const ca = await FactoryCa.load(files);
    const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
    const csr = csrToPem(createCsr({ commonName: "robot-008", key: privateKey }));
    const now = Date.now();
    const signed = ca.signCsr(csr, "robot-008", 86_400_000, now);
    const leaf = new X509Certificate(signed.chainPem);
    const root = new X509Certificate(ca.certPem);
    assert.ok(leaf.verify(root.publicKey), "not signed by the factory CA");
    assert.ok(leaf.checkIssued(root));
    assert.match(leaf.subject, /CN=robot-008/);
    // For the robot's own key: the CA never saw it.
    assert.equal(
      leaf.publicKey.export({ format: "der", type: "spki" }).toString("hex"),
      createPublicKey(privateKey).export({ format: "der", type: "spki" }).toString("hex"),
    );
    const info = parseCertDer(new Uint8Array(leaf.raw));
    assert.equal(info.isCa, false);
    assert.equal(info.keyUsage?.digitalSignature, true);
    assert.ok(Math.abs(signed.notAfter.getTime() - (now + 86_400_000)) < 1000);
    // SPIRE's x509pop:serialnumber selector: the serial's bytes in lowercase hex.
    assert.equal(BigInt(`0x${signed.serialHex}`), BigInt(`0x${leaf.serialNumber}`));
    assert.match(signed.serialHex, /^(?:[0-9a-f]{2})+$/);
    // What the enrollment parser wants of an x509pop certificate, it has.
    const e = parseEnrollment(
      renderEnrollment({
        version: 1,
        robotId: "robot-008",
        trustDomain: "k8s4r.example.org",
        spireServerAddress: "10.0.0.1:8081",
        brokerUrl: "ssl://10.0.0.1:8883",
        brokerSpiffeId: "spiffe://k8s4r.example.org/mqtt-broker",
        fleetServerSpiffeId: "spiffe://k8s4r.example.org/fleet-server",
        trustBundle: ca.certPem,
        createdAt: new Date(now),
        attestation: { type: "x509pop", certificate: signed.chainPem, expiresAt: signed.notAfter },
      }),
      "x.json",
    );
    assert.equal(e.attestation.type, "x509pop");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("factory CA: a serial whose first byte is below 0x10 keeps its leading 0 in serialHex (SPIRE's selector)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const files = factoryCaFiles(`${dir}/fca`);
    await ensureFactoryCa(files);
    const ca = await FactoryCa.load(files);
    const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
    const csr = csrToPem(createCsr({ commonName: "robot-008", key: privateKey }));
    const serial = Uint8Array.from([0x0a, 0x19, 0xc2, 0xcf, 0xe7, 0xee, 0x79, 0x1a]);
    const low = ca.signCsr(csr, "robot-008", 60_000, Date.now(), serial);
    // (node:crypto's serialNumber drops that 0: "A19C2CFE7EE791A".)
    assert.equal(
      BigInt(`0x${new X509Certificate(low.chainPem).serialNumber}`),
      0x0a19c2cfe7ee791an,
    );
    assert.equal(low.serialHex, "0a19c2cfe7ee791a");
    // The control: a first byte of 0x10 or more reads the same either way.
    serial[0] = 0x4b;
    assert.equal(
      ca.signCsr(csr, "robot-008", 60_000, Date.now(), serial).serialHex,
      "4b19c2cfe7ee791a",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("factory CA: a CSR for another robot, a readable key and a bad CSR are refused", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const files = factoryCaFiles(`${dir}/fca`);
    await ensureFactoryCa(files);
    const ca = await FactoryCa.load(files);
    const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
    const csr = csrToPem(createCsr({ commonName: "robot-009", key: privateKey }));
    assert.throws(
      () => ca.signCsr(csr, "robot-008", 1000),
      /the CSR is for CN=robot-009, not robot-008/,
    );
    assert.throws(
      () => ca.signCsr("-----BEGIN X-----\nAA==\n-----END X-----\n", "r", 1),
      /CERTIFICATE REQUEST/,
    );
    await Deno.chmod(files.key, 0o644);
    await assert.rejects(
      () => FactoryCa.load(files),
      /readable by others \(mode 644\); expected 0600/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
