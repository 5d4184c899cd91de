/**
 * A small X.509 certificate builder: EC P-256 / RSA subject keys, signed with ECDSA P-256 +
 * SHA-256 by the issuer's key, DER built with `der_writer.ts`. Used by k8s4r's factory CA (it
 * signs a robot's x509pop certificate for its CSR) and by the tests' throwaway CAs.
 *
 * Why not `openssl` through a subprocess or an npm library: node:crypto can sign but has no
 * certificate builder; a subprocess needs temp files for keys, and the maintained WebCrypto X.509
 * builder (@peculiar/x509) pulls in 17 packages and a global polyfill. The certificate is one
 * signed SEQUENCE of a few fields (~120 lines).
 */
import {
  createHash,
  createPublicKey,
  type KeyObject,
  randomBytes,
  sign,
  type X509Certificate,
} from "node:crypto";
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
import { children, readTlv, TAG } from "./der.ts";

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

export function name(cn?: string, o?: string): Uint8Array {
  const rdns: Uint8Array[] = [];
  if (o) rdns.push(set(seq(oid("2.5.4.10"), utf8(o))));
  if (cn) rdns.push(set(seq(oid("2.5.4.3"), utf8(cn))));
  return seq(...rdns);
}

function keyId(spki: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha1").update(spki).digest());
}

/** What signs: the issuer's certificate, key, and its encoded subject name and public key. */
export interface CertIssuer {
  cert: X509Certificate;
  key: KeyObject;
  subjectName: Uint8Array;
  spki: Uint8Array;
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
  exts.push(ext("2.5.29.14", false, octets(keyId(spki))));
  exts.push(
    ext("2.5.29.35", false, seq(implicit(0, keyId(issuer ? issuer.spki : spki)))),
  );
  const enc = new TextEncoder();
  const sans = [
    ...(params.dnsNames ?? []).map((d) => implicit(2, enc.encode(d))),
    ...(params.uris ?? []).map((u) => implicit(6, enc.encode(u))),
  ];
  if (sans.length) exts.push(ext("2.5.29.17", false, seq(...sans)));

  const serial = params.serial ?? randomBytes(16);
  serial[0] &= 0x7f;
  const tbs = seq(
    explicit(0, uint(new Uint8Array([2]))),
    uint(new Uint8Array(serial)),
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

/**
 * The issuer of an existing CA certificate (DER) and its key: its subject Name and
 * SubjectPublicKeyInfo exactly as encoded in the certificate, so issued certificates chain to it.
 */
export function issuerFromCertificate(cert: X509Certificate, key: KeyObject): CertIssuer {
  const der = new Uint8Array(cert.raw);
  const top = readTlv(der, 0);
  const [tbsT] = children(der, top);
  const fields = children(der, tbsT);
  // [0] version (explicit), serial, signature, issuer, validity, subject, spki
  const off = fields[0].tag === 0xa0 ? 1 : 0;
  const subjT = fields[off + 4];
  const spkiT = fields[off + 5];
  if (subjT?.tag !== TAG.SEQUENCE || spkiT?.tag !== TAG.SEQUENCE) {
    throw new Error("not an X.509 certificate: no subject or public key");
  }
  return {
    cert,
    key,
    subjectName: der.slice(subjT.start, subjT.end),
    spki: der.slice(spkiT.start, spkiT.end),
  };
}
