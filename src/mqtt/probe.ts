/**
 * The one MQTT CONNECT probe of k8s4r: "would this broker let me in?", over plain TCP or TLS
 * (mTLS with a client certificate). devenv's readiness checks, the doctor's broker checks and
 * the tests all use it. It opens one socket, sends an MQTT 3.1.1 CONNECT (wire.ts), reads the
 * CONNACK, says DISCONNECT and closes: no mqtt.js reconnect timers, never a second socket.
 * Credentials only ever travel in-process.
 *
 * `identifyOnly` (certificate clients): instead of a session, it asks the broker only to identify
 * the client: an MQTT 5 CONNECT with an authentication method no plugin supports
 * (wire.ts `encodeConnect5`). Mosquitto takes the certificate's CN as the username (and the
 * client id), then answers CONNACK 0x8C and closes, before it would look at, create or take
 * over a session. So it can run with a robot's own certificate while that robot's agent is
 * connected (the broker sets the client id from the CN: a normal CONNECT would kick the agent
 * and, with a clean start, delete its persistent session): tests/mqtt_probe_test.ts.
 *
 * It never throws: it resolves within `timeoutMs` with what happened, precisely:
 * - `accepted`, `refused`: a CONNACK arrived (`returnCode` 0, or 4 bad login, 5 not authorized);
 * - `identified` (`identifyOnly`): CONNACK 0x8C, the certificate's identity was taken and the
 *   connection ended before any session; a certificate without a CN is `refused` (0x86);
 * - `connection-refused`: nothing listens (ECONNREFUSED);
 * - `tls-error`: the TLS handshake failed or an alert came (the broker refused our certificate
 *   with TLS 1.3), or the broker's certificate did not verify (then no CONNECT is sent);
 * - `closed`: the broker closed the connection before CONNACK;
 * - `protocol-error`: the answer was no CONNACK;
 * - `timeout` (which stage: TCP, TLS handshake, CONNACK), `aborted`, other `error`s.
 */
import { Buffer } from "node:buffer";
import * as net from "node:net";
import * as tls from "node:tls";
import {
  CONNACK_CODES,
  DISCONNECT,
  encodeConnect,
  encodeConnect5,
  parseConnack,
  PROBE_AUTH_METHOD,
} from "./wire.ts";

export type MqttProbeOutcome =
  | "accepted"
  | "identified"
  | "refused"
  | "connection-refused"
  | "tls-error"
  | "closed"
  | "protocol-error"
  | "timeout"
  | "aborted"
  | "error";

export interface MqttProbeTls {
  /** PEM CA certificates to verify the broker with (the SPIRE bundle). */
  ca: string;
  /** PEM client chain and key (mTLS). Omit both for a client without a certificate. */
  cert?: string;
  key?: string;
  /** SNI and the name the broker's certificate must carry. Default `localhost`. */
  servername?: string;
  /**
   * Default true: a broker whose certificate does not verify against `ca` or is not for
   * `servername` ends the probe as `tls-error` before any CONNECT. false: the CONNECT is sent
   * anyway and `tls.authorized` says whether it verified (the doctor checks the broker's SPIFFE
   * ID itself, and asks whether a broker lets a client without a certificate in).
   */
  verify?: boolean;
}

export interface MqttProbeOptions {
  /** Default 127.0.0.1. */
  host?: string;
  port: number;
  /** Default `k8s4r-probe-<random>`. */
  clientId?: string;
  username?: string;
  password?: string;
  /** For the whole probe: connect, handshake, CONNACK. Default 3000. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Speak TLS (mTLS with `cert` and `key`). Plain TCP without it. */
  tls?: MqttProbeTls;
  /**
   * Identify, do not log in (see above): needs `tls` with a client certificate; `ok` means
   * `identified`. Touches no session, whatever client id the broker gives the certificate.
   */
  identifyOnly?: boolean;
}

export interface MqttProbeTlsResult {
  /** The handshake completed (from the client's side). */
  handshake: boolean;
  /** The broker's certificate verified against `ca`. */
  authorized: boolean;
  authorizationError?: string;
  /** `TLSv1.3`, `TLSv1.2`. */
  protocol?: string;
  /** The broker's chain, DER, leaf first. */
  peerChain: Uint8Array[];
}

export interface MqttProbeResult {
  /** A CONNACK with return code 0 arrived (`identifyOnly`: CONNACK 0x8C, `identified`). */
  ok: boolean;
  outcome: MqttProbeOutcome;
  /** The CONNACK return code, when one arrived. */
  returnCode?: number;
  /** One line: `127.0.0.1:8883 (mTLS): CONNACK 5 (not authorized)`. */
  detail: string;
  /** The socket or TLS error's message, when there was one. */
  error?: string;
  /** Its code (`ECONNREFUSED`, `ECONNRESET`, ...). */
  code?: string;
  /** With `tls`: what the handshake showed. */
  tls?: MqttProbeTlsResult;
}

type Stage = "connect" | "handshake" | "connack";

const TLS_ERROR = /ssl|tls|alert|certificate|handshake|wrong version|packet length/i;

export function probeMqtt(o: MqttProbeOptions): Promise<MqttProbeResult> {
  const host = o.host ?? "127.0.0.1";
  const timeoutMs = o.timeoutMs ?? 3000;
  const where = `${host.includes(":") ? `[${host}]` : host}:${o.port}${
    o.tls ? (o.tls.cert ? " (mTLS)" : " (TLS)") : ""
  }`;
  const servername = o.tls?.servername ?? "localhost";
  const clientId = o.clientId ?? `k8s4r-probe-${crypto.randomUUID().slice(0, 8)}`;
  if (o.identifyOnly && (!o.tls?.cert || o.username !== undefined || o.password !== undefined)) {
    // On a password listener this CONNECT skips the password check: it would prove nothing.
    return Promise.resolve({
      ok: false,
      outcome: "error",
      detail: `${where}: identifyOnly needs a client certificate and no username or password`,
    });
  }
  const packet = o.identifyOnly
    ? encodeConnect5({ clientId, authMethod: PROBE_AUTH_METHOD })
    : encodeConnect({ clientId, username: o.username, password: o.password });
  const tlsInfo: MqttProbeTlsResult | undefined = o.tls
    ? { handshake: false, authorized: false, peerChain: [] }
    : undefined;

  return new Promise((resolve) => {
    let stage: Stage = "connect";
    let buf = Buffer.alloc(0);
    let settled = false;
    let socket: net.Socket;
    try {
      socket = open();
    } catch (err) {
      // Node checks PEM key material up front; a bad one is this probe's answer, not a throw.
      const msg = (err as Error).message.split("\n")[0];
      return resolve({
        ok: false,
        outcome: o.tls ? "tls-error" : "error",
        detail: `${where}: ${o.tls ? "TLS: " : ""}${msg}`,
        error: msg,
        ...(tlsInfo ? { tls: tlsInfo } : {}),
      });
    }
    function open(): net.Socket {
      return o.tls
        ? tls.connect({
          host,
          port: o.port,
          ca: o.tls.ca,
          cert: o.tls.cert,
          key: o.tls.key,
          servername,
          minVersion: "TLSv1.2",
          // Verified below, so that the reason is reported and the chain is seen either way.
          rejectUnauthorized: false,
          checkServerIdentity: () => undefined,
        })
        : net.connect({ host, port: o.port });
    }

    const finish = (
      r: { outcome: MqttProbeOutcome; detail: string; returnCode?: number; err?: Error },
    ) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      o.signal?.removeEventListener("abort", onAbort);
      const code = (r.err as { code?: string } | undefined)?.code;
      const result: MqttProbeResult = {
        ok: o.identifyOnly ? r.outcome === "identified" : r.outcome === "accepted",
        outcome: r.outcome,
        ...(r.returnCode !== undefined ? { returnCode: r.returnCode } : {}),
        detail: `${where}: ${r.detail}`,
        ...(r.err ? { error: r.err.message.split("\n")[0] } : {}),
        ...(code ? { code } : {}),
        ...(tlsInfo ? { tls: tlsInfo } : {}),
      };
      if (result.ok) {
        // A clean goodbye (DISCONNECT, then TLS close_notify and FIN) keeps the broker's log
        // quiet; resolve once the socket is closed, so nothing is left running. After 0x8C
        // there is no connection to DISCONNECT: the broker closes it.
        const cap = setTimeout(() => socket.destroy(), 1000);
        socket.once("close", () => {
          clearTimeout(cap);
          resolve(result);
        });
        if (r.outcome === "identified") socket.end();
        else socket.end(DISCONNECT);
      } else {
        socket.destroy();
        resolve(result);
      }
    };

    const timer = setTimeout(() => {
      const what = stage === "connect"
        ? "no TCP connection"
        : stage === "handshake"
        ? "no TLS handshake"
        : "no CONNACK";
      finish({ outcome: "timeout", detail: `${what} within ${timeoutMs} ms` });
    }, timeoutMs);
    const onAbort = () => finish({ outcome: "aborted", detail: "aborted" });
    if (o.signal?.aborted) queueMicrotask(onAbort);
    else o.signal?.addEventListener("abort", onAbort, { once: true });

    const sendConnect = () => {
      stage = "connack";
      socket.write(packet);
    };

    socket.once("connect", () => {
      if (o.tls) stage = "handshake";
      else sendConnect();
    });
    if (o.tls) {
      const t = socket as tls.TLSSocket;
      t.once("secureConnect", () => {
        const info = tlsInfo!;
        info.handshake = true;
        info.authorized = t.authorized;
        if (!t.authorized) info.authorizationError = String(t.authorizationError);
        info.protocol = t.getProtocol() ?? undefined;
        let cert = t.getPeerCertificate(true) as tls.DetailedPeerCertificate | undefined;
        const seen = new Set<string>();
        while (cert?.raw && !seen.has(cert.fingerprint256)) {
          seen.add(cert.fingerprint256);
          info.peerChain.push(new Uint8Array(cert.raw));
          cert = cert.issuerCertificate;
        }
        if (o.tls!.verify !== false) {
          if (!t.authorized) {
            return finish({
              outcome: "tls-error",
              detail: `TLS: the broker's certificate is not trusted: ${info.authorizationError}`,
            });
          }
          const mismatch = tls.checkServerIdentity(servername, t.getPeerCertificate());
          if (mismatch) {
            return finish({
              outcome: "tls-error",
              detail: `TLS: the broker's certificate is not for ${servername}: ${mismatch.message}`,
            });
          }
        }
        sendConnect();
      });
    }

    socket.on("data", (d: Buffer) => {
      if (stage !== "connack") return;
      buf = Buffer.concat([buf, d]);
      let rc: number | undefined;
      try {
        rc = parseConnack(buf);
      } catch (err) {
        return finish({ outcome: "protocol-error", detail: (err as Error).message });
      }
      if (rc === undefined) return;
      const what = `CONNACK ${rc > 5 ? `0x${rc.toString(16)}` : rc} (${
        CONNACK_CODES[rc] ?? "unknown code"
      })`;
      if (o.identifyOnly && rc === 0x8c) {
        return finish({
          outcome: "identified",
          returnCode: rc,
          detail: `${what}: certificate identity taken, no session touched`,
        });
      }
      finish({ outcome: rc === 0 ? "accepted" : "refused", returnCode: rc, detail: what });
    });

    socket.on("error", (err: Error & { code?: string }) => {
      const msg = err.message.split("\n")[0];
      if (err.code === "ECONNREFUSED") {
        return finish({
          outcome: "connection-refused",
          detail: "connection refused (nothing listens)",
          err,
        });
      }
      if (o.tls && (stage === "handshake" || TLS_ERROR.test(msg))) {
        // With TLS 1.3 a broker that refuses our certificate says so after our side of the
        // handshake completed: an alert while we wait for CONNACK.
        return finish({ outcome: "tls-error", detail: `TLS: ${msg}`, err });
      }
      if (stage === "connack" && (err.code === "ECONNRESET" || err.code === "EPIPE")) {
        return finish({
          outcome: "closed",
          detail: `connection closed before CONNACK (${msg})`,
          err,
        });
      }
      finish({ outcome: "error", detail: msg, err });
    });

    socket.on("close", () => {
      if (stage === "handshake") {
        finish({ outcome: "tls-error", detail: "TLS: connection closed during the handshake" });
      } else {
        finish({ outcome: "closed", detail: "connection closed before CONNACK" });
      }
    });
  });
}
