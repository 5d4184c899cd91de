/**
 * Just enough DER (ASN.1 Distinguished Encoding Rules) reading for SPIFFE: split concatenated
 * certificates, as the Workload API sends them, and walk the TLVs of a certificate to read the
 * extensions `node:crypto` does not expose.
 */

export class DerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DerError";
  }
}

/** One tag-length-value element. Offsets are into the buffer it was read from. */
export interface Tlv {
  /** The identifier octet (single-byte tags only; SPIFFE never needs more). */
  tag: number;
  /** Offset of the identifier octet. */
  start: number;
  /** Offset of the first content byte. */
  contentStart: number;
  /** Offset just past the content. */
  end: number;
}

export const TAG = {
  BOOLEAN: 0x01,
  INTEGER: 0x02,
  BIT_STRING: 0x03,
  OCTET_STRING: 0x04,
  NULL: 0x05,
  OID: 0x06,
  UTF8_STRING: 0x0c,
  PRINTABLE_STRING: 0x13,
  IA5_STRING: 0x16,
  UTC_TIME: 0x17,
  GENERALIZED_TIME: 0x18,
  SEQUENCE: 0x30,
  SET: 0x31,
} as const;

function hex(n: number): string {
  return "0x" + n.toString(16).padStart(2, "0");
}

/** Reads the TLV starting at `offset`, checking that it fits inside `limit`. */
export function readTlv(buf: Uint8Array, offset: number, limit = buf.length): Tlv {
  if (offset >= limit) throw new DerError(`truncated DER: expected a tag at byte ${offset}`);
  const tag = buf[offset];
  if ((tag & 0x1f) === 0x1f) {
    throw new DerError(`unsupported multi-byte ASN.1 tag ${hex(tag)} at byte ${offset}`);
  }
  if (offset + 1 >= limit) {
    throw new DerError(`truncated DER: missing length after tag ${hex(tag)} at byte ${offset}`);
  }
  const first = buf[offset + 1];
  let length: number;
  let contentStart: number;
  if (first < 0x80) {
    length = first;
    contentStart = offset + 2;
  } else if (first === 0x80) {
    throw new DerError(`indefinite length at byte ${offset + 1} is not allowed in DER`);
  } else {
    const n = first & 0x7f;
    if (n > 4) {
      throw new DerError(`length of ${n} bytes at byte ${offset + 1} is too large`);
    }
    if (offset + 2 + n > limit) {
      throw new DerError(
        `truncated DER: length at byte ${offset + 1} needs ${n} more bytes, only ${
          limit - offset - 2
        } remain`,
      );
    }
    length = 0;
    for (let i = 0; i < n; i++) length = length * 256 + buf[offset + 2 + i];
    if (buf[offset + 2] === 0 || length < 0x80) {
      throw new DerError(`non-minimal length encoding at byte ${offset + 1}`);
    }
    contentStart = offset + 2 + n;
  }
  const end = contentStart + length;
  if (end > limit) {
    throw new DerError(
      `truncated DER: element at byte ${offset} declares ${length} content bytes, only ${
        limit - contentStart
      } remain`,
    );
  }
  return { tag, start: offset, contentStart, end };
}

/** The TLVs directly inside a constructed element. */
export function children(buf: Uint8Array, parent: Tlv): Tlv[] {
  const out: Tlv[] = [];
  let off = parent.contentStart;
  while (off < parent.end) {
    const t = readTlv(buf, off, parent.end);
    out.push(t);
    off = t.end;
  }
  return out;
}

export function content(buf: Uint8Array, t: Tlv): Uint8Array {
  return buf.subarray(t.contentStart, t.end);
}

/**
 * Splits DER certificates (or any SEQUENCEs) concatenated back to back, as in the Workload API's
 * `x509_svid` and `bundle` fields. `what` names the input in error messages.
 */
export function splitDer(data: Uint8Array, what = "DER data"): Uint8Array[] {
  if (data.length === 0) throw new DerError(`${what} is empty`);
  const out: Uint8Array[] = [];
  let off = 0;
  while (off < data.length) {
    if (data[off] !== TAG.SEQUENCE) {
      throw new DerError(
        `${what}: expected a SEQUENCE (0x30) at byte ${off} (certificate ${out.length + 1}), got ${
          hex(data[off])
        }`,
      );
    }
    let t: Tlv;
    try {
      t = readTlv(data, off);
    } catch (err) {
      if (err instanceof DerError) {
        throw new DerError(`${what}: certificate ${out.length + 1}: ${err.message}`);
      }
      throw err;
    }
    out.push(data.subarray(t.start, t.end));
    off = t.end;
  }
  return out;
}

/** Joins DER blobs, the inverse of `splitDer`. */
export function concatDer(parts: Uint8Array[]): Uint8Array {
  const total = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

/** Decodes an OBJECT IDENTIFIER's content bytes to dotted form. */
export function decodeOid(bytes: Uint8Array): string {
  if (bytes.length === 0) throw new DerError("empty OBJECT IDENTIFIER");
  const parts: number[] = [];
  let v = 0;
  for (let i = 0; i < bytes.length; i++) {
    v = v * 128 + (bytes[i] & 0x7f);
    if ((bytes[i] & 0x80) === 0) {
      if (parts.length === 0) {
        const first = v < 40 ? 0 : v < 80 ? 1 : 2;
        parts.push(first, v - first * 40);
      } else parts.push(v);
      v = 0;
    } else if (i === bytes.length - 1) {
      throw new DerError("truncated OBJECT IDENTIFIER");
    }
  }
  return parts.join(".");
}

/** Decodes UTCTime or GeneralizedTime (the `Z` forms X.509 requires). */
export function decodeTime(buf: Uint8Array, t: Tlv): Date {
  const s = new TextDecoder().decode(content(buf, t));
  let m: RegExpExecArray | null;
  let year: number;
  if (t.tag === TAG.UTC_TIME) {
    m = /^(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(s);
    if (!m) throw new DerError(`malformed UTCTime ${JSON.stringify(s)}`);
    const yy = Number(m[1]);
    year = yy >= 50 ? 1900 + yy : 2000 + yy;
  } else if (t.tag === TAG.GENERALIZED_TIME) {
    m = /^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(s);
    if (!m) throw new DerError(`malformed GeneralizedTime ${JSON.stringify(s)}`);
    year = Number(m[1]);
  } else {
    throw new DerError(`expected a time, got tag ${hex(t.tag)}`);
  }
  return new Date(
    Date.UTC(year, Number(m[2]) - 1, Number(m[3]), Number(m[4]), Number(m[5]), Number(m[6])),
  );
}
