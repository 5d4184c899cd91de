/**
 * PKCS#10 certificate signing requests (RFC 2986), just what a node needs to get a certificate
 * for a key it keeps: build one whose subject is a single CN, and read one back with its
 * self-signature checked. ECDSA (P-256, P-384) and RSA keys, the kinds SPIRE's x509pop
 * attestor signs challenges with.
 *
 * Why not an npm library: the one maintained X.509 builder for WebCrypto (@peculiar/x509) pulls
 * in 17 packages and a global `reflect-metadata` polyfill; a CSR is one signed SEQUENCE, built
 * with the DER writer the test CA already uses and read with the DER reader of `der.ts`.
 */
import { Buffer } from "node:buffer";
import { createPublicKey, type KeyObject, sign, verify } from "node:crypto";
import { children, content, decodeOid, DerError, readTlv, TAG } from "./der.ts";
import { bitString, explicit, oid, seq, set, uint, utf8 } from "./der_writer.ts";
import { decodePem, encodePem } from "./pem.ts";

const OID_CN = "2.5.4.3";
const SIG_ALGS: Record<string, { hash: string; kind: "ec" | "rsa" }> = {
  "1.2.840.10045.4.3.2": { hash: "sha256", kind: "ec" },
  "1.2.840.10045.4.3.3": { hash: "sha384", kind: "ec" },
  "1.2.840.10045.4.3.4": { hash: "sha512", kind: "ec" },
  "1.2.840.113549.1.1.11": { hash: "sha256", kind: "rsa" },
  "1.2.840.113549.1.1.12": { hash: "sha384", kind: "rsa" },
  "1.2.840.113549.1.1.13": { hash: "sha512", kind: "rsa" },
};
const NULL = new Uint8Array([0x05, 0x00]);

export class CsrError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CsrError";
  }
}

/** A CSR whose subject is `CN=<commonName>`, signed with `key` (EC P-256/P-384 or RSA). */
export function createCsr(opts: { commonName: string; key: KeyObject }): Uint8Array {
  const { key } = opts;
  if (key.type !== "private") throw new CsrError("a CSR is signed with a private key");
  const spki = new Uint8Array(createPublicKey(key).export({ format: "der", type: "spki" }));
  const subject = seq(set(seq(oid(OID_CN), utf8(opts.commonName))));
  // attributes [0] IMPLICIT SET OF Attribute: constructed, empty.
  const info = seq(uint(new Uint8Array([0])), subject, spki, explicit(0, new Uint8Array()));
  let alg: Uint8Array;
  let hash: string;
  if (key.asymmetricKeyType === "ec") {
    const curve = key.asymmetricKeyDetails?.namedCurve;
    hash = curve === "secp384r1" ? "sha384" : "sha256";
    if (curve !== "prime256v1" && curve !== "secp384r1") {
      throw new CsrError(`unsupported EC curve ${curve}: expected P-256 or P-384`);
    }
    alg = seq(oid(hash === "sha384" ? "1.2.840.10045.4.3.3" : "1.2.840.10045.4.3.2"));
  } else if (key.asymmetricKeyType === "rsa") {
    hash = "sha256";
    alg = seq(oid("1.2.840.113549.1.1.11"), NULL);
  } else {
    throw new CsrError(`unsupported key type ${key.asymmetricKeyType}: expected EC or RSA`);
  }
  const sig = new Uint8Array(sign(hash, info, { key, dsaEncoding: "der" }));
  return seq(info, alg, bitString(sig));
}

export function csrToPem(der: Uint8Array): string {
  return encodePem("CERTIFICATE REQUEST", der);
}

export interface ParsedCsr {
  der: Uint8Array;
  /** The subject's CN (the only attribute allowed in the subject). */
  commonName: string;
  publicKey: KeyObject;
  /** SubjectPublicKeyInfo DER: what the issuer puts in the certificate. */
  spki: Uint8Array;
  /** `ec` (with its curve) or `rsa` (with its modulus length). */
  keyDescription: string;
}

/**
 * Reads a PEM CSR (exactly one `CERTIFICATE REQUEST` block) and checks its self-signature, so
 * the requester holds the key. The subject must be one CN. Throws CsrError saying what is wrong.
 */
export function parseCsrPem(pem: string): ParsedCsr {
  let blocks;
  try {
    blocks = decodePem(pem, "CSR");
  } catch (err) {
    throw new CsrError(`malformed PEM: ${(err as Error).message}`);
  }
  const reqs = blocks.filter((b) =>
    b.type === "CERTIFICATE REQUEST" || b.type === "NEW CERTIFICATE REQUEST"
  );
  if (blocks.length !== 1 || reqs.length !== 1) {
    throw new CsrError(
      `expected exactly one CERTIFICATE REQUEST PEM block, got ${
        blocks.map((b) => b.type).join(", ") || "none"
      }`,
    );
  }
  return parseCsrDer(reqs[0].der);
}

export function parseCsrDer(der: Uint8Array): ParsedCsr {
  try {
    const top = readTlv(der, 0);
    if (top.tag !== TAG.SEQUENCE || top.end !== der.length) {
      throw new CsrError("expected one DER SEQUENCE");
    }
    const [infoT, algT, sigT] = children(der, top);
    if (!infoT || infoT.tag !== TAG.SEQUENCE || algT?.tag !== TAG.SEQUENCE) {
      throw new CsrError("expected SEQUENCE { info, signatureAlgorithm, signature }");
    }
    if (sigT?.tag !== TAG.BIT_STRING) throw new CsrError("signature is not a BIT STRING");
    const info = children(der, infoT);
    const [verT, subjT, spkiT] = info;
    if (verT?.tag !== TAG.INTEGER || content(der, verT).join(",") !== "0") {
      throw new CsrError("expected version 0 (v1)");
    }
    if (subjT?.tag !== TAG.SEQUENCE || spkiT?.tag !== TAG.SEQUENCE) {
      throw new CsrError("expected a subject Name and a SubjectPublicKeyInfo");
    }
    const attrs: string[] = [];
    let cn: string | undefined;
    for (const rdn of children(der, subjT)) {
      for (const atv of children(der, rdn)) {
        const [oT, vT] = children(der, atv);
        const o = decodeOid(content(der, oT));
        attrs.push(o);
        if (o === OID_CN && (vT.tag === TAG.UTF8_STRING || vT.tag === TAG.PRINTABLE_STRING)) {
          cn = new TextDecoder().decode(content(der, vT));
        }
      }
    }
    if (cn === undefined || attrs.length !== 1) {
      throw new CsrError(
        `expected a subject of exactly one CN, got ${attrs.length} attribute(s) (${
          attrs.join(", ") || "none"
        })`,
      );
    }
    const spki = der.slice(spkiT.start, spkiT.end);
    const publicKey = createPublicKey({ key: Buffer.from(spki), format: "der", type: "spki" });
    const algOid = decodeOid(content(der, children(der, algT)[0]));
    const alg = SIG_ALGS[algOid];
    if (!alg) throw new CsrError(`unsupported signature algorithm ${algOid}`);
    if (alg.kind !== publicKey.asymmetricKeyType) {
      throw new CsrError(
        `signature algorithm ${algOid} does not match a ${publicKey.asymmetricKeyType} key`,
      );
    }
    const d = publicKey.asymmetricKeyDetails ?? {};
    let keyDescription: string;
    if (publicKey.asymmetricKeyType === "ec") {
      if (d.namedCurve !== "prime256v1" && d.namedCurve !== "secp384r1") {
        throw new CsrError(`unsupported EC curve ${d.namedCurve}: expected P-256 or P-384`);
      }
      keyDescription = `EC ${d.namedCurve === "prime256v1" ? "P-256" : "P-384"}`;
    } else {
      if ((d.modulusLength ?? 0) < 2048) {
        throw new CsrError(`RSA key of ${d.modulusLength} bits: expected at least 2048`);
      }
      keyDescription = `RSA ${d.modulusLength}`;
    }
    const sigBits = content(der, sigT);
    if (sigBits[0] !== 0) throw new CsrError("signature BIT STRING has unused bits");
    const ok = verify(
      alg.hash,
      der.subarray(infoT.start, infoT.end),
      { key: publicKey, dsaEncoding: "der" },
      sigBits.subarray(1),
    );
    if (!ok) {
      throw new CsrError("the CSR's signature does not verify: it was not signed by its key");
    }
    return { der, commonName: cn, publicKey, spki, keyDescription };
  } catch (err) {
    if (err instanceof CsrError) throw err;
    if (err instanceof DerError) throw new CsrError(`malformed DER: ${err.message}`);
    throw new CsrError((err as Error).message.split("\n")[0]);
  }
}

/** True when the two keys (any mix of public and private) are the same key pair. */
export function samePublicKey(a: KeyObject, b: KeyObject): boolean {
  const pub = (k: KeyObject) =>
    Buffer.from(
      (k.type === "private" ? createPublicKey(k) : k).export({ format: "der", type: "spki" }),
    );
  return pub(a).equals(pub(b));
}
