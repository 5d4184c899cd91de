/**
 * The one X.509 certificate builder: EC P-256 / RSA subject keys, signed with ECDSA P-256 +
 * SHA-256 by the issuer's key, DER built with the tiny DER writer (`der_writer.ts`). Used by
 * `k8s4r ca` (a root CA and the CA SPIRE's UpstreamAuthority signs with), by the factory CA
 * (`src/control/factory_ca.ts`: it signs a robot's x509pop certificate for its CSR) and by the
 * test CA (`testing/test_ca.ts`).
 *
 * Why not `openssl` through a subprocess or an npm library: node:crypto can sign but has no
 * certificate builder; a subprocess needs temp files for keys, and the maintained WebCrypto X.509
 * builder (@peculiar/x509) pulls in 17 packages and a global polyfill. The certificate is one
 * signed SEQUENCE of a few fields (~120 lines).
 *
 * CAs carry basicConstraints cA (critical), keyCertSign+cRLSign(+digitalSignature) and no
 * extended key usage (which Go's verifier would otherwise apply to every leaf below them).
 */
import { createHash, createPublicKey, type KeyObject, randomBytes, sign } from "node:crypto";
import {
  bitString,
  bool,
  explicit,
  implicit,
  octets,
  oid,
  seq,
  set,
  time,
  uint,
  utf8,
} from "./der_writer.ts";
import { children, DerError, readTlv, TAG } from "./der.ts";

const ECDSA_SHA256 = seq(oid("1.2.840.10045.4.3.2"));
const EKU_SERVER_AUTH = "1.3.6.1.5.5.7.3.1";
const EKU_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2";

export interface CertParams {
  /** Serial number bytes (positive); default 16 random bytes. */
  serial?: Uint8Array;
  /** Subject CN. */
  commonName?: string;
  /** Subject O. */
  organization?: string;
  /** URI SANs (SPIFFE IDs or anything, to test bad input). */
  uris?: string[];
  dnsNames?: string[];
  isCa?: boolean;
  /** Key usage bits; default CA: keyCertSign+cRLSign+digitalSignature, leaf: digitalSignature+keyEncipherment. */
  keyUsage?: Array<"digitalSignature" | "keyEncipherment" | "keyCertSign" | "cRLSign">;
  /** Extended key usage; default for leaves serverAuth+clientAuth, none for CAs. */
  extKeyUsage?: Array<"serverAuth" | "clientAuth">;
  notBefore: Date;
  notAfter: Date;
  /**
   * Subject and authority key identifiers; default SHA-1 of the subject's and the issuer's
   * SubjectPublicKeyInfo. Only tests set them (to build hostile chains whose certificates all
   * name each other as issuer).
   */
  subjectKeyId?: Uint8Array;
  authorityKeyId?: Uint8Array;
}

const KU_BITS = { digitalSignature: 0, keyEncipherment: 2, keyCertSign: 5, cRLSign: 6 } as const;

function keyUsageExt(names: NonNullable<CertParams["keyUsage"]>): Uint8Array {
  let byte = 0;
  for (const n of names) byte |= 0x80 >> KU_BITS[n];
  let unused = 0;
  while (unused < 8 && byte !== 0 && (byte & (1 << unused)) === 0) unused++;
  return bitString(new Uint8Array([byte]), byte === 0 ? 0 : unused);
}

function ext(id: string, critical: boolean, value: Uint8Array): Uint8Array {
  return critical ? seq(oid(id), bool(true), octets(value)) : seq(oid(id), octets(value));
}

function name(cn?: string, o?: string): Uint8Array {
  const rdns: Uint8Array[] = [];
  if (o) rdns.push(set(seq(oid("2.5.4.10"), utf8(o))));
  if (cn) rdns.push(set(seq(oid("2.5.4.3"), utf8(cn))));
  return seq(...rdns);
}

function keyId(spki: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha1").update(spki).digest());
}

/**
 * Builds and signs one certificate. `issuer` undefined means self-signed. `subjectKey` may be a
 * public key when there is an issuer.
 */
export function buildCertificate(
  params: CertParams,
  subjectKey: KeyObject,
  issuer?: CertIssuer,
): { der: Uint8Array; subjectName: Uint8Array; spki: Uint8Array } {
  const pub = subjectKey.type === "public" ? subjectKey : createPublicKey(subjectKey);
  const spki = new Uint8Array(pub.export({ format: "der", type: "spki" }));
  const subjectName = name(params.commonName, params.organization);
  const isCa = params.isCa ?? false;
  const exts: Uint8Array[] = [
    ext("2.5.29.19", true, isCa ? seq(bool(true)) : seq()),
    ext(
      "2.5.29.15",
      true,
      keyUsageExt(
        params.keyUsage ??
          (isCa ? ["digitalSignature", "keyCertSign", "cRLSign"] : [
            "digitalSignature",
            "keyEncipherment",
          ]),
      ),
    ),
  ];
  const eku = params.extKeyUsage ?? (isCa ? [] : ["serverAuth", "clientAuth"]);
  if (eku.length) {
    exts.push(
      ext(
        "2.5.29.37",
        false,
        seq(...eku.map((e) => oid(e === "serverAuth" ? EKU_SERVER_AUTH : EKU_CLIENT_AUTH))),
      ),
    );
  }
  exts.push(ext("2.5.29.14", false, octets(params.subjectKeyId ?? keyId(spki))));
  exts.push(
    ext(
      "2.5.29.35",
      false,
      seq(implicit(0, params.authorityKeyId ?? keyId(issuer ? issuer.spki : spki))),
    ),
  );
  const enc = new TextEncoder();
  const sans = [
    ...(params.dnsNames ?? []).map((d) => implicit(2, enc.encode(d))),
    ...(params.uris ?? []).map((u) => implicit(6, enc.encode(u))),
  ];
  if (sans.length) exts.push(ext("2.5.29.17", false, seq(...sans)));

  const serial = new Uint8Array(params.serial ?? randomBytes(16));
  serial[0] &= 0x7f;
  const tbs = seq(
    explicit(0, uint(new Uint8Array([2]))),
    uint(serial),
    ECDSA_SHA256,
    issuer ? issuer.subjectName : subjectName,
    seq(time(params.notBefore), time(params.notAfter)),
    subjectName,
    spki,
    explicit(3, seq(...exts)),
  );
  const signature = sign("sha256", tbs, {
    key: issuer ? issuer.key : subjectKey,
    dsaEncoding: "der",
  });
  const der = seq(tbs, ECDSA_SHA256, bitString(new Uint8Array(signature)));
  return { der, subjectName, spki };
}

/** What signing needs of the issuer: its key, and its subject and public key as DER. */
export interface CertIssuer {
  key: KeyObject;
  subjectName: Uint8Array;
  spki: Uint8Array;
}

/**
 * The issuer of certificates signed by the CA certificate `certDer` (DER) with `key`: its subject
 * Name and SubjectPublicKeyInfo exactly as encoded in the certificate, so issued certificates
 * chain to it.
 */
export function issuerFromCert(certDer: Uint8Array, key: KeyObject): CertIssuer {
  const certT = readTlv(certDer, 0);
  if (certT.tag !== TAG.SEQUENCE) throw new DerError("certificate is not a SEQUENCE");
  const [tbsT] = children(certDer, certT);
  if (!tbsT || tbsT.tag !== TAG.SEQUENCE) throw new DerError("tbsCertificate is not a SEQUENCE");
  const tbs = children(certDer, tbsT);
  const i = tbs[0]?.tag === 0xa0 ? 1 : 0; // [0] version
  // serial, signature algorithm, issuer, validity, subject, subjectPublicKeyInfo
  const subject = tbs[i + 4];
  const spki = tbs[i + 5];
  if (!subject || !spki) throw new DerError("certificate has no subject or public key");
  return {
    key,
    subjectName: certDer.slice(subject.start, subject.end),
    spki: certDer.slice(spki.start, spki.end),
  };
}
