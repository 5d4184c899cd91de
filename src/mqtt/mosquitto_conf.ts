/**
 * The one mosquitto.conf reader, beside its writer (`renderMosquittoConf` in broker_config.ts;
 * mosquitto_conf_test.ts reads back what it writes). `k8s4r doctor` checks the generated config
 * with it.
 *
 * Reads a mosquitto.conf into listeners and their settings. Options that come before the first
 * `listener` line are global (k8s4r writes its auth settings there; with `per_listener_settings true`, mosquitto would scope
 * `allow_anonymous`, `password_file`, `acl_file` to each listener).
 */

export interface MosquittoListener {
  port: number;
  /** Bind address, undefined = all interfaces. */
  address?: string;
  line: number;
  options: Map<string, { value: string; line: number }>;
}

export interface MosquittoConf {
  global: Map<string, { value: string; line: number }>;
  listeners: MosquittoListener[];
}

export class MosquittoConfError extends Error {
  constructor(readonly line: number, message: string) {
    super(`line ${line}: ${message}`);
  }
}

export function parseMosquittoConf(src: string): MosquittoConf {
  const global = new Map<string, { value: string; line: number }>();
  const listeners: MosquittoListener[] = [];
  src.split("\n").forEach((raw, idx) => {
    const line = idx + 1;
    const text = raw.trim();
    if (!text || text.startsWith("#")) return;
    const m = /^([A-Za-z_][A-Za-z0-9_]*)(?:\s+(.*))?$/.exec(text);
    if (!m) throw new MosquittoConfError(line, `cannot read '${text}'`);
    const key = m[1];
    const value = (m[2] ?? "").trim();
    if (key === "listener") {
      const parts = value.split(/\s+/);
      const port = Number(parts[0]);
      if (!/^\d+$/.test(parts[0] ?? "") || port > 65535) {
        throw new MosquittoConfError(line, `listener: expected a port number, got '${value}'`);
      }
      listeners.push({ port, address: parts[1], line, options: new Map() });
      return;
    }
    const target = listeners.length ? listeners[listeners.length - 1].options : global;
    target.set(key, { value, line });
  });
  return { global, listeners };
}

/** A setting as it applies to a listener (its own, else the global one). */
export function listenerOption(
  conf: MosquittoConf,
  l: MosquittoListener,
  key: string,
): { value: string; line: number } | undefined {
  return l.options.get(key) ?? conf.global.get(key);
}

export function isLoopback(address: string | undefined): boolean {
  if (!address) return false;
  return address === "localhost" || address === "::1" || address.startsWith("127.");
}
