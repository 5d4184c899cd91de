/** PEM encoding and decoding (RFC 7468), strict enough to give clear errors. */
import { Buffer } from "node:buffer";

export class PemError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "PemError";
  }
}

export interface PemBlock {
  type: string;
  der: Uint8Array;
}

/** Decodes every PEM block in `text`. Throws PemError when there is none or one is broken. */
export function decodePem(text: string, what = "PEM data"): PemBlock[] {
  const blocks: PemBlock[] = [];
  const re = /-----BEGIN ([A-Z0-9 ]+)-----([\s\S]*?)-----END ([A-Z0-9 ]+)-----/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(text)) !== null) {
    if (m[1] !== m[3]) {
      throw new PemError(`${what}: block ${blocks.length + 1} begins ${m[1]} but ends ${m[3]}`);
    }
    const body = m[2].replace(/\s+/g, "");
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(body) || body.length % 4 !== 0) {
      throw new PemError(`${what}: block ${blocks.length + 1} (${m[1]}) is not valid base64`);
    }
    blocks.push({ type: m[1], der: new Uint8Array(Buffer.from(body, "base64")) });
  }
  if (blocks.length === 0) throw new PemError(`${what}: no PEM block found`);
  return blocks;
}

/** Decodes PEM that must contain only blocks of one type. */
export function decodePemOfType(text: string, type: string, what = "PEM data"): Uint8Array[] {
  const blocks = decodePem(text, what);
  blocks.forEach((b, i) => {
    if (b.type !== type) {
      throw new PemError(`${what}: block ${i + 1} is ${b.type}, expected ${type}`);
    }
  });
  return blocks.map((b) => b.der);
}

export function encodePem(type: string, der: Uint8Array): string {
  const b64 = Buffer.from(der).toString("base64");
  const lines = b64.match(/.{1,64}/g) ?? [];
  return `-----BEGIN ${type}-----\n${lines.join("\n")}\n-----END ${type}-----\n`;
}
