/**
 * The factory CA: what signs a robot's x509pop certificate. SPIRE's `x509pop` NodeAttestor
 * trusts its certificate (`ca_bundle_path`); `k8s4r robot add ID --attestation x509pop --csr FILE`
 * signs the robot's CSR with its key. The robot made its key itself (`k8s4r agent csr`): only the
 * public key comes here.
 *
 * A real fleet's factory CA lives in the factory's provisioning station (an HSM, an offline
 * machine); `devenv start --attestation x509pop` plays one with a key file (0600) under
 * `.dev-env/factory-ca/`. The files: `ca.crt` (PEM, what SPIRE trusts) and `ca.key` (PKCS#8 PEM,
 * 0600, directory 0700).
 */
import { Buffer } from "node:buffer";
import {
  createPrivateKey,
  generateKeyPairSync,
  type KeyObject,
  X509Certificate,
} from "node:crypto";
import { dirname, join } from "node:path";
import { CliError, errorMessage } from "../cli/errors.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
import { parseCsrPem } from "../spiffe/csr.ts";
import { encodePem } from "../spiffe/pem.ts";
import { buildCertificate, type CertIssuer, issuerFromCert } from "../spiffe/cert_builder.ts";
import { x509popCaFingerprint, x509popSerialHex } from "../spire/node_attestor.ts";

export interface FactoryCaFiles {
  cert: string;
  key: string;
}

/** 16 random bytes, positive and without a leading zero byte: the DER integer's own bytes. */
function randomSerial(): Uint8Array {
  const serial = crypto.getRandomValues(new Uint8Array(16));
  serial[0] &= 0x7f;
  if (serial[0] === 0) serial[0] = 1;
  return serial;
}

export function factoryCaFiles(dir: string): FactoryCaFiles {
  return { cert: join(dir, "ca.crt"), key: join(dir, "ca.key") };
}

/** Ten years: a factory CA outlives the robots it vouches for. */
const CA_VALIDITY_MS = 10 * 365 * 86_400_000;

/** Creates the CA if its files are missing; an existing one is kept. */
export async function ensureFactoryCa(
  files: FactoryCaFiles,
  commonName = "k8s4r factory CA",
): Promise<"created" | "kept"> {
  try {
    await Deno.stat(files.key);
    await Deno.stat(files.cert);
    return "kept";
  } catch { /* create below */ }
  await Deno.mkdir(dirname(files.key), { recursive: true, mode: 0o700 });
  await Deno.chmod(dirname(files.key), 0o700);
  const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const now = Date.now();
  const built = buildCertificate({
    commonName,
    organization: "k8s4r",
    isCa: true,
    notBefore: new Date(now - 60_000),
    notAfter: new Date(now + CA_VALIDITY_MS),
  }, privateKey);
  const keyPem = privateKey.export({ format: "pem", type: "pkcs8" }).toString();
  await writeFileAtomic(files.key, keyPem, 0o600);
  await writeFileAtomic(files.cert, encodePem("CERTIFICATE", built.der), 0o644);
  return "created";
}

export interface SignedRobotCert {
  /** PEM, leaf first (then nothing: the factory CA is the root SPIRE trusts). */
  chainPem: string;
  notAfter: Date;
  /** How SPIRE's `x509pop:serialnumber:` selector says the serial (`x509popSerialHex`). */
  serialHex: string;
  /** The factory CA's `x509pop:ca:fingerprint:` value (`x509popCaFingerprint`). */
  caFingerprint: string;
}

export class FactoryCa {
  private constructor(
    private readonly issuer: CertIssuer,
    readonly certPem: string,
    /** The CA certificate's notAfter: no robot certificate outlives it. */
    readonly notAfter: Date,
    /** SPIRE's `x509pop:ca:fingerprint:` value of this CA (`x509popCaFingerprint`). */
    readonly fingerprint: string,
  ) {}

  /** Loads the CA; refuses a key file that others can read. */
  static async load(files: FactoryCaFiles): Promise<FactoryCa> {
    let keyPem: string, certPem: string;
    try {
      const st = await Deno.stat(files.key);
      if (st.mode !== null && (st.mode & 0o077) !== 0) {
        throw new CliError(
          `${files.key}: the factory CA key is readable by others (mode ${
            (st.mode & 0o777).toString(8)
          }); expected 0600`,
          1,
          `chmod 600 ${files.key}`,
        );
      }
      keyPem = await Deno.readTextFile(files.key);
      certPem = await Deno.readTextFile(files.cert);
    } catch (err) {
      if (err instanceof CliError) throw err;
      throw new CliError(
        `the factory CA cannot be read (${errorMessage(err)})`,
        1,
        "on a dev stack: k8s4r devenv start --attestation x509pop; otherwise set factoryCa in " +
          "the control-host config",
      );
    }
    let key: KeyObject, cert: X509Certificate;
    try {
      key = createPrivateKey(keyPem);
      cert = new X509Certificate(certPem);
    } catch (err) {
      throw new CliError(
        `${files.cert}, ${files.key}: not a PEM certificate and key: ${errorMessage(err)}`,
      );
    }
    if (!cert.checkPrivateKey(key)) {
      throw new CliError(`${files.key}: the key is not the one of ${files.cert}`);
    }
    if (!cert.ca) throw new CliError(`${files.cert}: not a CA certificate`);
    return new FactoryCa(
      issuerFromCert(new Uint8Array(cert.raw), key),
      certPem,
      new Date(cert.validTo),
      x509popCaFingerprint(new Uint8Array(cert.raw)),
    );
  }

  /**
   * Signs the robot's CSR (its self-signature checked, its CN must be `robotId`): CN=robotId,
   * keyUsage digitalSignature (x509pop signs a challenge with it), extKeyUsage clientAuth.
   * `serial` (big-endian bytes) is for tests; by default 16 random bytes, positive.
   */
  signCsr(
    csrPem: string,
    robotId: string,
    ttlMs: number,
    now = Date.now(),
    serial: Uint8Array = randomSerial(),
  ): SignedRobotCert {
    const csr = parseCsrPem(csrPem);
    if (csr.commonName !== robotId) {
      throw new CliError(
        `the CSR is for CN=${csr.commonName}, not ${robotId}`,
        2,
        `on the robot: k8s4r agent csr --robot-id ${robotId} > ${robotId}.csr`,
      );
    }
    const notAfter = new Date(Math.min(now + ttlMs, this.notAfter.getTime()));
    const built = buildCertificate(
      {
        commonName: robotId,
        keyUsage: ["digitalSignature"],
        extKeyUsage: ["clientAuth"],
        notBefore: new Date(now - 60_000),
        notAfter,
        serial,
      },
      csr.publicKey,
      this.issuer,
    );
    const leaf = new X509Certificate(Buffer.from(built.der));
    return {
      chainPem: encodePem("CERTIFICATE", built.der),
      notAfter: new Date(leaf.validTo),
      serialHex: x509popSerialHex(BigInt(`0x${leaf.serialNumber}`)),
      caFingerprint: this.fingerprint,
    };
  }
}
