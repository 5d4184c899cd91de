/**
 * Reads the parts of an X.509 certificate SPIFFE needs and `node:crypto`'s X509Certificate does
 * not expose reliably across runtimes: URI and DNS SANs, basicConstraints, keyUsage and the
 * validity period, straight from the DER.
 */
import { X509Certificate } from "node:crypto";
import {
  children,
  content,
  decodeOid,
  decodeTime,
  DerError,
  readTlv,
  TAG,
  type Tlv,
} from "./der.ts";

export interface CertInfo {
  notBefore: Date;
  notAfter: Date;
  uris: string[];
  dnsNames: string[];
  /** basicConstraints cA; false when the extension is absent. */
  isCa: boolean;
  /** keyUsage bits, undefined when the extension is absent. */
  keyUsage?: KeyUsage;
}

export interface KeyUsage {
  digitalSignature: boolean;
  keyEncipherment: boolean;
  keyCertSign: boolean;
  cRLSign: boolean;
}

const OID_SAN = "2.5.29.17";
const OID_BASIC_CONSTRAINTS = "2.5.29.19";
const OID_KEY_USAGE = "2.5.29.15";

const cache = new WeakMap<X509Certificate, CertInfo>();

/** Parses (and caches) the SPIFFE-relevant fields of a certificate. Throws DerError. */
export function certInfo(cert: X509Certificate): CertInfo {
  const hit = cache.get(cert);
  if (hit) return hit;
  const info = parseCertDer(new Uint8Array(cert.raw));
  cache.set(cert, info);
  return info;
}

export function parseCertDer(der: Uint8Array): CertInfo {
  const certT = readTlv(der, 0);
  if (certT.tag !== TAG.SEQUENCE) throw new DerError("certificate is not a SEQUENCE");
  const [tbsT] = children(der, certT);
  if (!tbsT || tbsT.tag !== TAG.SEQUENCE) throw new DerError("tbsCertificate is not a SEQUENCE");
  const tbs = children(der, tbsT);
  let i = 0;
  if (tbs[i]?.tag === 0xa0) i++; // [0] version
  // serial, signature algorithm, issuer, validity
  const validityT = tbs[i + 3];
  if (!validityT || validityT.tag !== TAG.SEQUENCE) {
    throw new DerError("certificate validity is missing");
  }
  const [nbT, naT] = children(der, validityT);
  if (!nbT || !naT) throw new DerError("certificate validity is incomplete");
  const info: CertInfo = {
    notBefore: decodeTime(der, nbT),
    notAfter: decodeTime(der, naT),
    uris: [],
    dnsNames: [],
    isCa: false,
  };
  const extsWrapper = tbs.find((t) => t.tag === 0xa3);
  if (!extsWrapper) return info;
  const [extsT] = children(der, extsWrapper);
  if (!extsT) return info;
  for (const extT of children(der, extsT)) {
    const parts = children(der, extT);
    const oid = decodeOid(content(der, parts[0]));
    const value = parts[parts.length - 1];
    if (value.tag !== TAG.OCTET_STRING) throw new DerError(`extension ${oid} has no value`);
    const inner = readTlv(der, value.contentStart, value.end);
    if (oid === OID_SAN) readSan(der, inner, info);
    else if (oid === OID_BASIC_CONSTRAINTS) {
      const bc = children(der, inner);
      info.isCa = bc[0]?.tag === TAG.BOOLEAN && der[bc[0].contentStart] !== 0;
    } else if (oid === OID_KEY_USAGE) {
      const bits = content(der, inner);
      const b0 = bits.length > 1 ? bits[1] : 0;
      info.keyUsage = {
        digitalSignature: (b0 & 0x80) !== 0,
        keyEncipherment: (b0 & 0x20) !== 0,
        keyCertSign: (b0 & 0x04) !== 0,
        cRLSign: (b0 & 0x02) !== 0,
      };
    }
  }
  return info;
}

function readSan(der: Uint8Array, seq: Tlv, info: CertInfo): void {
  const dec = new TextDecoder();
  for (const name of children(der, seq)) {
    if (name.tag === 0x86) info.uris.push(dec.decode(content(der, name)));
    else if (name.tag === 0x82) info.dnsNames.push(dec.decode(content(der, name)));
  }
}

/** A short human name for a certificate in messages: its subject, or its serial. */
export function describeCert(cert: X509Certificate): string {
  const subject = cert.subject?.replace(/\n/g, ", ");
  return subject ? `"${subject}"` : `serial ${cert.serialNumber}`;
}
