/**
 * Just enough MQTT 3.1.1 to ask a broker "would you let me in?": a CONNECT packet and the
 * CONNACK answer, for the one MQTT CONNECT probe (probe.ts), which devenv, the doctor and the
 * tests use instead of mqtt.js (that would leave reconnect timers behind and may open more than
 * one socket). Credentials only ever travel in-process.
 */
import { Buffer } from "node:buffer";

function str(s: string): Buffer {
  const b = Buffer.from(s, "utf8");
  const len = Buffer.alloc(2);
  len.writeUInt16BE(b.length);
  return Buffer.concat([len, b]);
}

export function remainingLength(n: number): Buffer {
  const out: number[] = [];
  do {
    let byte = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) byte |= 0x80;
    out.push(byte);
  } while (n > 0);
  return Buffer.from(out);
}

export function encodeConnect(
  opts: { clientId: string; username?: string; password?: string; keepAlive?: number },
): Uint8Array {
  let flags = 0x02; // clean session
  if (opts.username !== undefined) flags |= 0x80;
  if (opts.password !== undefined) flags |= 0x40;
  const ka = Buffer.alloc(2);
  ka.writeUInt16BE(opts.keepAlive ?? 10);
  const parts = [str("MQTT"), Buffer.from([0x04, flags]), ka, str(opts.clientId)];
  if (opts.username !== undefined) parts.push(str(opts.username));
  if (opts.password !== undefined) parts.push(str(opts.password));
  const body = Buffer.concat(parts);
  return new Uint8Array(Buffer.concat([Buffer.from([0x10]), remainingLength(body.length), body]));
}

export const DISCONNECT = new Uint8Array([0xe0, 0x00]);

/** The CONNACK return code, `undefined` while incomplete; throws on another packet type. */
export function parseConnack(buf: Uint8Array): number | undefined {
  if (buf.length < 4) return undefined;
  if (buf[0] !== 0x20 || buf[1] !== 0x02) {
    throw new Error(`expected CONNACK, got packet type 0x${buf[0].toString(16)}`);
  }
  return buf[3];
}

export const CONNACK_CODES: Record<number, string> = {
  0: "accepted",
  1: "unacceptable protocol version",
  2: "identifier rejected",
  3: "server unavailable",
  4: "bad user name or password",
  5: "not authorized",
};
