/**
 * A tiny DER writer, the inverse of `der.ts`: enough to build X.509 certificates (the test CA,
 * `testing/test_ca.ts`) and PKCS#10 certificate signing requests (a robot's x509pop CSR).
 */

function lengthBytes(n: number): number[] {
  if (n < 0x80) return [n];
  const out: number[] = [];
  while (n > 0) {
    out.unshift(n & 0xff);
    n = Math.floor(n / 256);
  }
  return [0x80 | out.length, ...out];
}

export function tlv(tag: number, body: Uint8Array): Uint8Array {
  const len = lengthBytes(body.length);
  const out = new Uint8Array(1 + len.length + body.length);
  out[0] = tag;
  out.set(len, 1);
  out.set(body, 1 + len.length);
  return out;
}

export function cat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

export const seq = (...parts: Uint8Array[]) => tlv(0x30, cat(...parts));
export const set = (...parts: Uint8Array[]) => tlv(0x31, cat(...parts));
export const octets = (b: Uint8Array) => tlv(0x04, b);
export const bool = (v: boolean) => tlv(0x01, new Uint8Array([v ? 0xff : 0]));
const enc = new TextEncoder();
export const utf8 = (s: string) => tlv(0x0c, enc.encode(s));
/** [n] EXPLICIT */
export const explicit = (n: number, inner: Uint8Array) => tlv(0xa0 | n, inner);
/** [n] IMPLICIT primitive (e.g. SAN GeneralName choices). */
export const implicit = (n: number, body: Uint8Array) => tlv(0x80 | n, body);

/** A positive INTEGER from unsigned big-endian bytes. */
export function uint(bytes: Uint8Array): Uint8Array {
  let i = 0;
  while (i < bytes.length - 1 && bytes[i] === 0) i++;
  let b = bytes.subarray(i);
  if (b[0] & 0x80) b = cat(new Uint8Array([0]), b);
  return tlv(0x02, b);
}

export function oid(dotted: string): Uint8Array {
  const parts = dotted.split(".").map(Number);
  const out: number[] = [parts[0] * 40 + parts[1]];
  for (const p of parts.slice(2)) {
    const bytes: number[] = [p & 0x7f];
    let v = Math.floor(p / 128);
    while (v > 0) {
      bytes.unshift((v & 0x7f) | 0x80);
      v = Math.floor(v / 128);
    }
    out.push(...bytes);
  }
  return tlv(0x06, new Uint8Array(out));
}

/** BIT STRING with the DER count of unused trailing bits. */
export function bitString(bytes: Uint8Array, unusedBits = 0): Uint8Array {
  return tlv(0x03, cat(new Uint8Array([unusedBits]), bytes));
}

/** UTCTime before 2050, GeneralizedTime from then on, as RFC 5280 requires. */
export function time(d: Date): Uint8Array {
  const p = (n: number, w = 2) => String(n).padStart(w, "0");
  const rest = `${p(d.getUTCMonth() + 1)}${p(d.getUTCDate())}${p(d.getUTCHours())}${
    p(d.getUTCMinutes())
  }${p(d.getUTCSeconds())}Z`;
  const y = d.getUTCFullYear();
  if (y >= 1950 && y < 2050) return tlv(0x17, enc.encode(p(y % 100) + rest));
  return tlv(0x18, enc.encode(p(y, 4) + rest));
}
