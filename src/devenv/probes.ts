/**
 * Readiness and health probes of the devenv components. Each one answers a real question
 * (does the broker accept an MQTT session? does the server answer HTTP?) and never throws:
 * it resolves `{ok, detail}` within its timeout.
 */
import * as net from "node:net";
import { probeMqtt } from "../mqtt/probe.ts";

export interface ProbeResult {
  ok: boolean;
  detail: string;
}

// The two MQTT probes below are devenv's `{ok, detail}` view of the one MQTT CONNECT probe
// (src/mqtt/probe.ts), which says precisely what happened (CONNACK code, TLS alert, refused).

/** Plain MQTT on the loopback listener, with the server's username and password. */
export async function probeMqttPassword(
  port: number,
  username: string,
  password: string,
  timeoutMs = 2000,
): Promise<ProbeResult> {
  const r = await probeMqtt({ port, username, password, timeoutMs });
  return { ok: r.ok, detail: r.detail };
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
 * after the client's side of the handshake has finished). With a certificate, the CONNECT is
 * identify-only (src/mqtt/probe.ts): the broker makes the CN the client id, and a probe must
 * not take over the session of whoever holds that CN.
 */
export async function probeMqttTls(o: MtlsProbeOptions): Promise<ProbeResult> {
  const r = await probeMqtt({
    port: o.port,
    identifyOnly: o.cert !== undefined,
    timeoutMs: o.timeoutMs ?? 3000,
    tls: { ca: o.ca, cert: o.cert, key: o.key, servername: o.servername },
  });
  return { ok: r.ok, detail: r.detail };
}

/**
 * GET a URL; ok on 2xx. Returns the parsed JSON body when there is one. `client`: TLS settings
 * (the CA to trust, a client certificate) for the fleet server's HTTPS API.
 */
export async function httpGetJson(
  url: string,
  timeoutMs = 2000,
  client?: Deno.HttpClient,
): Promise<{ ok: boolean; status: number; body: unknown; detail: string }> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs), client });
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
export function tcpOpen(port: number, timeoutMs = 1000, host = "127.0.0.1"): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
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
