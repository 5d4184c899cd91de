/**
 * The fleet's network addresses, parsed one way everywhere: the broker URL robots dial (only
 * over TLS) and the SPIRE server's `host:port`. The agent config, the enrollment file and the
 * doctor use these.
 */

export interface BrokerUrl {
  url: string;
  host: string;
  port: number;
}

const TLS_SCHEMES = ["ssl", "mqtts", "tls"];
const PLAIN_SCHEMES = ["mqtt", "tcp", "ws", "wss", "http", "https"];

/**
 * `ssl://`, `mqtts://` and `tls://` all mean MQTT over TLS; they are normalised to `mqtts://`.
 * Anything else is refused: a robot never falls back to plaintext. Throws an Error whose
 * message is what was expected (callers add where the URL came from).
 */
export function parseBrokerUrl(raw: string): BrokerUrl {
  const m = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/(.*)$/.exec(raw.trim());
  if (!m) {
    throw new Error(
      `expected a broker URL like ssl://localhost:8883, got ${JSON.stringify(raw)}`,
    );
  }
  const scheme = m[1].toLowerCase();
  if (!TLS_SCHEMES.includes(scheme)) {
    if (PLAIN_SCHEMES.includes(scheme)) {
      throw new Error(
        `${scheme}:// is refused: robots reach the broker only over mTLS; use ssl://, mqtts:// or tls:// (got ${
          JSON.stringify(raw)
        })`,
      );
    }
    throw new Error(
      `unknown scheme ${scheme}://: expected ssl://, mqtts:// or tls:// (got ${
        JSON.stringify(raw)
      })`,
    );
  }
  let u: URL;
  try {
    // URL only parses host:port for "special" schemes; reuse https parsing for the authority.
    u = new URL(`https://${m[2]}`);
  } catch {
    throw new Error(`expected host[:port] after ${scheme}://, got ${JSON.stringify(raw)}`);
  }
  if (!u.hostname || u.username || u.password || (u.pathname !== "/" && u.pathname !== "")) {
    throw new Error(
      `expected ${scheme}://host[:port] without user, password or path, got ${JSON.stringify(raw)}`,
    );
  }
  if (u.search || u.hash) {
    throw new Error(`expected ${scheme}://host[:port] without query, got ${JSON.stringify(raw)}`);
  }
  // new URL("https://h:443") drops the default port; read it from the text instead.
  const portText = /:(\d+)\/?$/.exec(m[2])?.[1];
  const port = portText !== undefined ? Number(portText) : 8883;
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new Error(`expected a port in 1..65535, got ${JSON.stringify(raw)}`);
  }
  const host = u.hostname.replace(/^\[(.*)\]$/, "$1");
  const hostPart = host.includes(":") ? `[${host}]` : host;
  return { url: `mqtts://${hostPart}:${port}`, host, port };
}

export interface HostPort {
  /** Without IPv6 brackets. */
  host: string;
  port: number;
}

/**
 * `host:port` (`[v6]:port` for IPv6), e.g. the SPIRE server's `localhost:8081`. Throws an Error
 * whose message is what was expected.
 */
export function parseHostPort(raw: string, example = "localhost:8081"): HostPort {
  const m = /^(\[[^\]\s]+\]|[^:\s\[\]/]+):(\d{1,5})$/.exec(raw);
  if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) {
    throw new Error(`expected host:port like ${example}, got ${JSON.stringify(raw)}`);
  }
  return { host: m[1].replace(/^\[(.*)\]$/, "$1"), port: Number(m[2]) };
}

/** `host:port`, bracketing an IPv6 host. */
export function formatHostPort(host: string, port: number): string {
  return `${host.includes(":") ? `[${host}]` : host}:${port}`;
}

/**
 * Whether a host (name or address, IPv6 with or without brackets) is this machine's loopback:
 * `localhost`, `::1` or 127.0.0.0/8.
 */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[(.*)\]$/, "$1").toLowerCase();
  return h === "localhost" || h === "::1" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h);
}

/** `host[:port]` of a Host header or an origin's authority; undefined when malformed. */
export function parseAuthority(
  s: string,
  defaultPort: number,
): { name: string; port: number } | undefined {
  const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?$/.exec(s);
  if (!m) return undefined;
  const port = m[2] !== undefined ? Number(m[2]) : defaultPort;
  if (port < 1 || port > 65535) return undefined;
  return { name: m[1].toLowerCase().replace(/\.$/, ""), port };
}
