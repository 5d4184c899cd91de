/**
 * Readiness and health probes of the devenv components. Each one answers a real question
 * (does the broker accept an MQTT session? does the server answer HTTP?) and never throws:
 * it resolves `{ok, detail}` within its timeout.
 */
import { Buffer } from "node:buffer";
import * as net from "node:net";
import * as tls from "node:tls";
import { CONNACK_CODES, DISCONNECT, encodeConnect, parseConnack } from "../mqtt/wire.ts";

export interface ProbeResult {
  ok: boolean;
  detail: string;
}

/** Parses a CONNACK: `{ok, detail}`, or undefined while fewer than 4 bytes have arrived. */
export function connackResult(buf: Uint8Array): ProbeResult | undefined {
  let rc: number | undefined;
  try {
    rc = parseConnack(buf);
  } catch (err) {
    return { ok: false, detail: (err as Error).message };
  }
  if (rc === undefined) return undefined;
  return { ok: rc === 0, detail: `CONNACK ${CONNACK_CODES[rc] ?? `code ${rc}`}` };
}

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
      const r = connackResult(buf);
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
    encodeConnect({
      clientId: `k8s4r-probe-${crypto.randomUUID().slice(0, 8)}`,
      username,
      password,
    }),
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
    encodeConnect({ clientId: `k8s4r-probe-${crypto.randomUUID().slice(0, 8)}` }),
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
