/**
 * Just enough MQTT to ask a broker "would you let me in?": a CONNECT packet (3.1.1, or 5 with an
 * authentication method for the identify-only probe) and the CONNACK answer, for the one MQTT
 * CONNECT probe (probe.ts), which devenv, the doctor and the tests use instead of mqtt.js (that
 * would leave reconnect timers behind and may open more than one socket). Credentials only ever
 * travel in-process.
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

/**
 * The authentication method of the identify-only probe. No Mosquitto plugin k8s4r loads (nor
 * any other we know of) implements it, so the broker answers CONNACK 0x8C.
 */
export const PROBE_AUTH_METHOD = "k8s4r-identify-only";

/**
 * An MQTT 5 CONNECT with clean start and an Authentication Method property (0x15), no
 * username or password. Mosquitto 2.0 (handle_connect.c) handles it in this order: the TLS
 * client certificate's CN becomes the username (refused with 0x86 without a CN), the client id
 * is replaced by it (`use_username_as_clientid`), and only then the authentication method is
 * offered to the plugins: none supports it, so CONNACK 0x8C "bad authentication method" ends
 * the connection BEFORE connect__on_authorised, where an existing session of that client id
 * would be taken over. (On a password listener the password is never checked on this path: it
 * proves nothing there.)
 */
export function encodeConnect5(
  opts: { clientId: string; authMethod: string; keepAlive?: number },
): Uint8Array {
  const ka = Buffer.alloc(2);
  ka.writeUInt16BE(opts.keepAlive ?? 10);
  const props = Buffer.concat([Buffer.from([0x15]), str(opts.authMethod)]);
  const body = Buffer.concat([
    str("MQTT"),
    Buffer.from([0x05, 0x02]), // MQTT 5, clean start
    ka,
    remainingLength(props.length),
    props,
    str(opts.clientId),
  ]);
  return new Uint8Array(Buffer.concat([Buffer.from([0x10]), remainingLength(body.length), body]));
}

export const DISCONNECT = new Uint8Array([0xe0, 0x00]);

/**
 * The CONNACK return code (3.1.1) or reason code (5), `undefined` while incomplete; throws on
 * another packet type.
 */
export function parseConnack(buf: Uint8Array): number | undefined {
  if (buf.length < 1) return undefined;
  if (buf[0] !== 0x20) {
    throw new Error(`expected CONNACK, got packet type 0x${buf[0].toString(16)}`);
  }
  // Remaining length: a variable byte integer (2 for 3.1.1; 3 or more with MQTT 5 properties).
  let len = 0;
  let i = 1;
  for (let mul = 1;; mul *= 128, i++) {
    if (i >= buf.length) return undefined;
    if (i > 4) throw new Error("CONNACK: malformed remaining length");
    len += (buf[i] & 0x7f) * mul;
    if ((buf[i] & 0x80) === 0) break;
  }
  if (len < 2) throw new Error(`CONNACK: remaining length ${len}, expected at least 2`);
  if (buf.length < i + 1 + len) return undefined;
  return buf[i + 2];
}

export const CONNACK_CODES: Record<number, string> = {
  0: "accepted",
  1: "unacceptable protocol version",
  2: "identifier rejected",
  3: "server unavailable",
  4: "bad user name or password",
  5: "not authorized",
  // MQTT 5 reason codes
  0x80: "unspecified error",
  0x84: "unsupported protocol version",
  0x85: "client identifier not valid",
  0x86: "bad user name or password",
  0x87: "not authorized",
  0x88: "server unavailable",
  0x8a: "banned",
  0x8c: "bad authentication method",
  0x95: "packet too large",
  0x97: "quota exceeded",
  0x9f: "connection rate exceeded",
};
