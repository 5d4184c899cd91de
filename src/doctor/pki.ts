/** PEM/DER helpers and certificate facts the doctor reports. Built on node:crypto only. */
import { createHash, X509Certificate } from "node:crypto";
import { Buffer } from "node:buffer";

const PEM_RE = /-----BEGIN ([A-Z0-9 ]+)-----([\s\S]*?)-----END \1-----/g;

/** Every `CERTIFICATE` block of a PEM text, as DER. Throws on a malformed block. */
export function pemCertificates(pem: string): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (const m of pem.matchAll(PEM_RE)) {
    if (m[1] !== "CERTIFICATE") continue;
    const der = new Uint8Array(Buffer.from(m[2].replace(/\s+/g, ""), "base64"));
    new X509Certificate(der); // throws when it is not a certificate
    out.push(der);
  }
  return out;
}

export function derToPem(der: Uint8Array, label = "CERTIFICATE"): string {
  const b64 = Buffer.from(der).toString("base64");
  return `-----BEGIN ${label}-----\n${b64.match(/.{1,64}/g)!.join("\n")}\n-----END ${label}-----\n`;
}

/** Splits concatenated DER certificates (as the Workload API sends them). */
export function splitDer(buf: Uint8Array): Uint8Array[] {
  const out: Uint8Array[] = [];
  let i = 0;
  while (i < buf.length) {
    if (buf[i] !== 0x30) throw new Error(`bad DER at offset ${i}: expected SEQUENCE`);
    let len = buf[i + 1];
    let hdr = 2;
    if (len & 0x80) {
      const n = len & 0x7f;
      if (n < 1 || n > 4) throw new Error(`bad DER length at offset ${i}`);
      len = 0;
      for (let j = 0; j < n; j++) len = len * 256 + buf[i + 2 + j];
      hdr += n;
    }
    const end = i + hdr + len;
    if (end > buf.length) throw new Error(`truncated DER at offset ${i}`);
    out.push(buf.subarray(i, end));
    i = end;
  }
  return out;
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
  const c = new X509Certificate(der);
  const san = c.subjectAltName ?? "";
  const items = san.split(/,\s*/).filter(Boolean);
  const pick = (prefix: string) =>
    items.filter((s) => s.startsWith(prefix)).map((s) =>
      s.slice(prefix.length).replace(/^"|"$/g, "")
    );
  return {
    subject: c.subject.replace(/\n/g, ", "),
    uris: pick("URI:"),
    dnsNames: pick("DNS:"),
    notBefore: Date.parse(c.validFrom),
    notAfter: Date.parse(c.validTo),
    isCa: c.ca,
  };
}

/**
 * Verifies that `chain[0]` chains up to one of `roots` through `chain[1..]`, with every
 * certificate inside its validity window at `nowMs`.
 */
export function verifyChainWithRoots(
  chain: Uint8Array[],
  roots: Uint8Array[],
  nowMs: number,
): { ok: boolean; error?: string } {
  if (!chain.length) return { ok: false, error: "empty certificate chain" };
  if (!roots.length) return { ok: false, error: "empty trust bundle" };
  const certs = chain.map((d) => new X509Certificate(d));
  const anchors = roots.map((d) => new X509Certificate(d));
  const rootPrints = new Set(roots.map(fingerprint));
  let cur = certs[0];
  let curDer = chain[0];
  for (let depth = 0; depth < 10; depth++) {
    const from = Date.parse(cur.validFrom), to = Date.parse(cur.validTo);
    if (nowMs < from) {
      return { ok: false, error: `${name(cur)} is not valid before ${cur.validFrom}` };
    }
    if (nowMs > to) return { ok: false, error: `${name(cur)} expired at ${cur.validTo}` };
    if (rootPrints.has(fingerprint(curDer))) return { ok: true };
    const anchor = anchors.find((a) => cur.checkIssued(a) && cur.verify(a.publicKey));
    if (anchor) {
      const t = Date.parse(anchor.validTo);
      if (nowMs > t) return { ok: false, error: `CA ${name(anchor)} expired at ${anchor.validTo}` };
      return { ok: true };
    }
    const idx = certs.findIndex((c, i) => i > 0 && cur.checkIssued(c) && cur.verify(c.publicKey));
    if (idx < 0) {
      return { ok: false, error: `${name(cur)} was not signed by any CA in the bundle` };
    }
    cur = certs[idx];
    curDer = chain[idx];
  }
  return { ok: false, error: "certificate chain too long" };
}

function name(c: X509Certificate): string {
  const uri = /URI:([^,]+)/.exec(c.subjectAltName ?? "")?.[1];
  return uri ?? (c.subject.replace(/\n/g, ", ") || "certificate");
}
