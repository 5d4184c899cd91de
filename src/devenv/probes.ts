/**
 * Readiness and health probes of the devenv components. Each one answers a real question
 * (does the broker accept an MQTT session? does the server answer HTTP?) and never throws:
 * it resolves `{ok, detail}` within its timeout.
 */
import { Buffer } from "node:buffer";
import * as net from "node:net";
import * as tls from "node:tls";

export interface ProbeResult {
  ok: boolean;
  detail: string;
}

/** An MQTT 3.1.1 CONNECT packet (clean session). Credentials only ever travel in-process. */
export function encodeConnect(
  clientId: string,
  username?: string,
  password?: string,
  keepAliveS = 10,
): Uint8Array {
  const str = (s: string) => {
    const b = Buffer.from(s, "utf8");
    const len = Buffer.alloc(2);
    len.writeUInt16BE(b.length);
    return Buffer.concat([len, b]);
  };
  let flags = 0x02;
  if (username !== undefined) flags |= 0x80;
  if (password !== undefined) flags |= 0x40;
  const ka = Buffer.alloc(2);
  ka.writeUInt16BE(keepAliveS);
  const variable = Buffer.concat([str("MQTT"), Buffer.from([0x04, flags]), ka]);
  const payload = Buffer.concat([
    str(clientId),
    ...(username !== undefined ? [str(username)] : []),
    ...(password !== undefined ? [str(password)] : []),
  ]);
  const body = Buffer.concat([variable, payload]);
  return Buffer.concat([Buffer.from([0x10]), encodeRemainingLength(body.length), body]);
}

export function encodeRemainingLength(n: number): Buffer {
  const out: number[] = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out.push(b);
  } while (n > 0);
  return Buffer.from(out);
}

const CONNACK_CODES: Record<number, string> = {
  0: "accepted",
  1: "unacceptable protocol version",
  2: "identifier rejected",
  3: "server unavailable",
  4: "bad user name or password",
  5: "not authorized",
};

/** Parses a CONNACK: `{ok, detail}`, or undefined while fewer than 4 bytes have arrived. */
export function parseConnack(buf: Uint8Array): ProbeResult | undefined {
  if (buf.length < 4) return undefined;
  if (buf[0] !== 0x20 || buf[1] !== 0x02) {
    return { ok: false, detail: `expected CONNACK, got packet type 0x${buf[0].toString(16)}` };
  }
  const rc = buf[3];
  return { ok: rc === 0, detail: `CONNACK ${CONNACK_CODES[rc] ?? `code ${rc}`}` };
}

const DISCONNECT = new Uint8Array([0xe0, 0x00]);

function mqttSession(
  socket: net.Socket,
  connectEvent: string,
  packet: Uint8Array,
  timeoutMs: number,
  what: string,
): Promise<ProbeResult> {
  return new Promise((resolve) => {
    let buf = Buffer.alloc(0);
    let settled = false;
    const done = (r: ProbeResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (r.ok) {
        // A clean goodbye (DISCONNECT, then TLS close_notify) keeps the broker's log quiet.
        socket.end(DISCONNECT);
        const t = setTimeout(() => socket.destroy(), 1000);
        socket.once("close", () => clearTimeout(t));
      } else socket.destroy();
      resolve(r);
    };
    const timer = setTimeout(
      () => done({ ok: false, detail: `${what}: no CONNACK within ${timeoutMs} ms` }),
      timeoutMs,
    );
    socket.once(connectEvent, () => socket.write(packet));
    socket.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      const r = parseConnack(buf);
      if (r) done({ ok: r.ok, detail: `${what}: ${r.detail}` });
    });
    socket.on("error", (e: Error) => done({ ok: false, detail: `${what}: ${e.message}` }));
    socket.on(
      "close",
      () => done({ ok: false, detail: `${what}: connection closed before CONNACK` }),
    );
  });
}

/** Plain MQTT on the loopback listener, with the server's username and password. */
export function probeMqttPassword(
  port: number,
  username: string,
  password: string,
  timeoutMs = 2000,
): Promise<ProbeResult> {
  const socket = net.connect({ host: "127.0.0.1", port });
  return mqttSession(
    socket,
    "connect",
    encodeConnect(`k8s4r-probe-${crypto.randomUUID().slice(0, 8)}`, username, password),
    timeoutMs,
    `127.0.0.1:${port}`,
  );
}

export interface MtlsProbeOptions {
  port: number;
  /** PEM CA bundle to verify the broker (the SPIRE bundle). */
  ca: string;
  /** A client certificate chain and key accepted by the broker (any SVID of the trust domain). */
  cert?: string;
  key?: string;
  servername?: string;
  timeoutMs?: number;
}

/**
 * A TLS handshake on the mTLS listener followed by an MQTT CONNECT: only a CONNACK proves that
 * the broker accepted the client certificate (with TLS 1.3 a refused certificate shows only
 * after the client's side of the handshake has finished).
 */
export function probeMqttTls(o: MtlsProbeOptions): Promise<ProbeResult> {
  const socket = tls.connect({
    host: "127.0.0.1",
    port: o.port,
    ca: o.ca,
    cert: o.cert,
    key: o.key,
    servername: o.servername ?? "localhost",
    minVersion: "TLSv1.2",
  });
  return mqttSession(
    socket,
    "secureConnect",
    encodeConnect(`k8s4r-probe-${crypto.randomUUID().slice(0, 8)}`),
    o.timeoutMs ?? 3000,
    `127.0.0.1:${o.port} (mTLS)`,
  );
}

/** GET a URL; ok on 2xx. Returns the parsed JSON body when there is one. */
export async function httpGetJson(
  url: string,
  timeoutMs = 2000,
): Promise<{ ok: boolean; status: number; body: unknown; detail: string }> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
    const text = await res.text();
    let body: unknown = undefined;
    try {
      body = JSON.parse(text);
    } catch { /* not JSON */ }
    return { ok: res.ok, status: res.status, body, detail: `HTTP ${res.status}` };
  } catch (err) {
    return {
      ok: false,
      status: 0,
      body: undefined,
      detail: err instanceof Error ? err.message : String(err),
    };
  }
}

/** True when something accepts TCP connections on 127.0.0.1:port. */
export function tcpOpen(port: number, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: "127.0.0.1", port });
    const t = setTimeout(() => {
      s.destroy();
      resolve(false);
    }, timeoutMs);
    s.once("connect", () => {
      clearTimeout(t);
      s.destroy();
      resolve(true);
    });
    s.once("error", () => {
      clearTimeout(t);
      s.destroy();
      resolve(false);
    });
  });
}
