/**
 * A minimal MQTT 3.1.1 CONNECT probe over plain TCP: readiness checks (tests, devenv, doctor)
 * that must not leave mqtt.js timers or reconnect loops behind. It sends CONNECT, reads CONNACK,
 * sends DISCONNECT and closes.
 */

import { CONNACK_CODES, DISCONNECT, encodeConnect, parseConnack } from "./wire.ts";

export interface ProbeResult {
  /** True when the broker answered CONNACK with return code 0. */
  ok: boolean;
  /** CONNACK return code (5 = not authorized, 4 = bad username or password), or -1. */
  returnCode: number;
  error?: string;
}

/** Builds an MQTT 3.1.1 CONNECT packet (clean session, keepalive 10 s). */
export function connectPacket(
  clientId: string,
  creds?: { username: string; password: string },
): Uint8Array {
  return encodeConnect({ clientId, username: creds?.username, password: creds?.password });
}

export async function mqttConnectProbe(
  host: string,
  port: number,
  creds?: { username: string; password: string },
  timeoutMs = 3000,
): Promise<ProbeResult> {
  let conn: Deno.TcpConn | undefined;
  const timer = setTimeout(() => {
    try {
      conn?.close();
    } catch { /* closed */ }
    conn = undefined;
  }, timeoutMs);
  try {
    conn = await Deno.connect({ hostname: host, port });
    const clientId = `k8s4r-probe-${crypto.randomUUID().slice(0, 8)}`;
    await conn.write(connectPacket(clientId, creds));
    const buf = new Uint8Array(4);
    let got = 0;
    while (got < 4) {
      const n = await conn.read(buf.subarray(got));
      if (n === null) {
        return { ok: false, returnCode: -1, error: "connection closed before CONNACK" };
      }
      got += n;
    }
    let rc: number;
    try {
      rc = parseConnack(buf)!;
    } catch {
      return { ok: false, returnCode: -1, error: "unexpected answer (not a CONNACK)" };
    }
    if (rc === 0) {
      await conn.write(DISCONNECT).catch(() => {});
      return { ok: true, returnCode: 0 };
    }
    return { ok: false, returnCode: rc, error: `CONNACK ${rc}: ${CONNACK_CODES[rc] ?? "refused"}` };
  } catch (err) {
    return { ok: false, returnCode: -1, error: (err as Error).message };
  } finally {
    clearTimeout(timer);
    try {
      conn?.close();
    } catch { /* closed */ }
  }
}
