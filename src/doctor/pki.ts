/**
 * The certificate facts the doctor reports, as thin wrappers over the SPIFFE layer's DER and PEM
 * modules (src/spiffe), so that parsing lives in one place.
 */
import { createHash, X509Certificate } from "node:crypto";
import { splitDer as splitDerStrict } from "../spiffe/der.ts";
import { decodePemOfType, encodePem } from "../spiffe/pem.ts";
import { parseCertDer } from "../spiffe/x509.ts";

/** Every `CERTIFICATE` block of a PEM text, as DER. Throws on a malformed block. */
export function pemCertificates(pem: string): Uint8Array[] {
  const ders = decodePemOfType(pem, "CERTIFICATE");
  for (const der of ders) new X509Certificate(der); // throws when it is not a certificate
  return ders;
}

export function derToPem(der: Uint8Array, label = "CERTIFICATE"): string {
  return encodePem(label, der);
}

/** Splits concatenated DER certificates (as the Workload API sends them). */
export function splitDer(buf: Uint8Array): Uint8Array[] {
  return splitDerStrict(buf, "certificate chain");
}

export function fingerprint(der: Uint8Array): string {
  return createHash("sha256").update(der).digest("hex");
}

export interface CertFacts {
  subject: string;
  uris: string[];
  dnsNames: string[];
  notBefore: number;
  notAfter: number;
  isCa: boolean;
}

export function certFacts(der: Uint8Array): CertFacts {
  const info = parseCertDer(der);
  return {
    subject: (new X509Certificate(der).subject ?? "").replace(/\n/g, ", "),
    uris: info.uris,
    dnsNames: info.dnsNames,
    notBefore: info.notBefore.getTime(),
    notAfter: info.notAfter.getTime(),
    isCa: info.isCa,
  };
}
