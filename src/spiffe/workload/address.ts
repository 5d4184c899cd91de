/**
 * Workload API endpoint addresses (SPIFFE Workload Endpoint spec): `unix:///path`, `unix:/path`,
 * `tcp://127.0.0.1:8000`, `tcp:127.0.0.1:8000`. As a convenience an absolute path means a unix
 * socket (spire-agent's own `-socketPath` takes a path).
 */

export const ENDPOINT_SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET";

export class AddressError extends Error {
  constructor(readonly address: string, reason: string) {
    super(`invalid Workload API address ${JSON.stringify(address)}: ${reason}`);
    this.name = "AddressError";
  }
}

export type WorkloadAddress =
  | { kind: "unix"; path: string; /** what the user gave */ original: string; grpcTarget: string }
  | { kind: "tcp"; host: string; port: number; original: string; grpcTarget: string };

const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

export function parseWorkloadAddress(addr: string): WorkloadAddress {
  if (!addr) throw new AddressError(addr, "address is empty");
  if (addr.startsWith("/")) {
    return { kind: "unix", path: addr, original: addr, grpcTarget: `unix://${addr}` };
  }
  const m = /^([A-Za-z][A-Za-z0-9+.-]*):(.*)$/.exec(addr);
  if (!m) {
    throw new AddressError(addr, "expected unix:///path/to/socket or tcp://IP:PORT");
  }
  const scheme = m[1].toLowerCase();
  let rest = m[2];
  if (/[?#]/.test(rest)) throw new AddressError(addr, "query and fragment are not allowed");
  if (scheme === "unix") {
    if (rest.startsWith("//")) {
      rest = rest.slice(2);
      const slash = rest.indexOf("/");
      const authority = slash < 0 ? rest : rest.slice(0, slash);
      if (authority !== "") {
        throw new AddressError(
          addr,
          `a unix address has no host (got '${authority}'); use unix:///path`,
        );
      }
      rest = slash < 0 ? "" : rest.slice(slash);
    }
    if (!rest.startsWith("/")) throw new AddressError(addr, "the socket path must be absolute");
    if (rest === "/") throw new AddressError(addr, "the socket path is missing");
    return { kind: "unix", path: rest, original: addr, grpcTarget: `unix://${rest}` };
  }
  if (scheme === "tcp") {
    if (rest.startsWith("//")) rest = rest.slice(2);
    if (rest.includes("@")) throw new AddressError(addr, "userinfo is not allowed");
    if (rest.includes("/")) throw new AddressError(addr, "a tcp address has no path");
    const hp = /^(.*):(\d+)$/.exec(rest);
    if (!hp) throw new AddressError(addr, "expected tcp://IP:PORT");
    const host = hp[1];
    if (!IPV4.test(host)) {
      throw new AddressError(addr, `the host must be an IPv4 address, got '${host}'`);
    }
    const port = Number(hp[2]);
    if (port < 1 || port > 65535) throw new AddressError(addr, `port ${hp[2]} is out of range`);
    return { kind: "tcp", host, port, original: addr, grpcTarget: `${host}:${port}` };
  }
  throw new AddressError(addr, `unsupported scheme '${m[1]}' (expected unix or tcp)`);
}

/** The address from the option, else `SPIFFE_ENDPOINT_SOCKET` in `env`. */
export function resolveWorkloadAddress(
  address: string | undefined,
  env: Record<string, string | undefined> = {},
): WorkloadAddress {
  const a = address ?? env[ENDPOINT_SOCKET_ENV];
  if (!a) {
    throw new AddressError(
      "",
      `no Workload API address: pass one or set ${ENDPOINT_SOCKET_ENV} (e.g. unix:///tmp/spire-agent/agent.sock)`,
    );
  }
  return parseWorkloadAddress(a);
}
