/**
 * A minimal MQTT 3.1.1 CONNECT probe over plain TCP: readiness checks (tests, devenv, doctor)
 * that must not leave mqtt.js timers or reconnect loops behind. It sends CONNECT, reads CONNACK,
 * sends DISCONNECT and closes.
 */

export interface ProbeResult {
  /** True when the broker answered CONNACK with return code 0. */
  ok: boolean;
  /** CONNACK return code (5 = not authorized, 4 = bad username or password), or -1. */
  returnCode: number;
  error?: string;
}

const CONNACK_MESSAGES: Record<number, string> = {
  1: "unacceptable protocol version",
  2: "identifier rejected",
  3: "server unavailable",
  4: "bad username or password",
  5: "not authorized",
};

function utf8Field(s: string): Uint8Array {
  const b = new TextEncoder().encode(s);
  const out = new Uint8Array(2 + b.length);
  out[0] = b.length >> 8;
  out[1] = b.length & 0xff;
  out.set(b, 2);
  return out;
}

function remainingLength(n: number): number[] {
  const out: number[] = [];
  do {
    let byte = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) byte |= 0x80;
    out.push(byte);
  } while (n > 0);
  return out;
}

/** Builds an MQTT 3.1.1 CONNECT packet (clean session, keepalive 10 s). */
export function connectPacket(
  clientId: string,
  creds?: { username: string; password: string },
): Uint8Array {
  const parts: Uint8Array[] = [
    utf8Field("MQTT"),
    new Uint8Array([4, 0x02 | (creds ? 0xc0 : 0), 0, 10]),
    utf8Field(clientId),
  ];
  if (creds) parts.push(utf8Field(creds.username), utf8Field(creds.password));
  const body = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    body.set(p, off);
    off += p.length;
  }
  return new Uint8Array([0x10, ...remainingLength(body.length), ...body]);
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
    if (buf[0] !== 0x20 || buf[1] !== 2) {
      return { ok: false, returnCode: -1, error: "unexpected answer (not a CONNACK)" };
    }
    const rc = buf[3];
    if (rc === 0) {
      await conn.write(new Uint8Array([0xe0, 0])).catch(() => {});
      return { ok: true, returnCode: 0 };
    }
    return {
      ok: false,
      returnCode: rc,
      error: `CONNACK ${rc}: ${CONNACK_MESSAGES[rc] ?? "refused"}`,
    };
  } catch (err) {
    return { ok: false, returnCode: -1, error: (err as Error).message };
  } finally {
    clearTimeout(timer);
    try {
      conn?.close();
    } catch { /* closed */ }
  }
}
