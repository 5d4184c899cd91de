/**
 * The standard gRPC health check (`grpc.health.v1.Health/Check`) over a unix socket. Both the
 * SPIRE server's admin socket and the SPIRE agent's Workload API socket serve it: the server
 * answers SERVING once its datastore holds the trust bundle, the agent once it has attested and
 * its own Workload API answers (that is what `spire-agent healthcheck` asks too).
 *
 * The two messages are tiny, so they are encoded by hand instead of pulling in a protobuf
 * runtime:
 *   HealthCheckRequest  { string service = 1; }
 *   HealthCheckResponse { ServingStatus status = 1; }   // 0 UNKNOWN, 1 SERVING, 2 NOT_SERVING,
 *                                                        // 3 SERVICE_UNKNOWN
 */
import { CliError } from "../cli/errors.ts";
import { GrpcChannel, GrpcError } from "../spiffe/workload/grpc.ts";

export type HealthStatus = "SERVING" | "NOT_SERVING" | "UNKNOWN" | "SERVICE_UNKNOWN";

const STATUS_NAMES: Record<number, HealthStatus> = {
  0: "UNKNOWN",
  1: "SERVING",
  2: "NOT_SERVING",
  3: "SERVICE_UNKNOWN",
};

const CHECK_PATH = "/grpc.health.v1.Health/Check";

/** Encodes `HealthCheckRequest{service}`. An empty service (the whole server) is zero bytes. */
export function encodeHealthCheckRequest(service = ""): Uint8Array {
  if (service === "") return new Uint8Array(0);
  const bytes = new TextEncoder().encode(service);
  return new Uint8Array([0x0a, ...encodeVarint(bytes.length), ...bytes]);
}

/** Decodes `HealthCheckResponse`, skipping unknown fields. Throws on malformed input. */
export function decodeHealthCheckResponse(buf: Uint8Array): HealthStatus {
  let status = 0; // proto3 default when the field is absent
  let pos = 0;
  while (pos < buf.length) {
    const [key, p1] = readVarint(buf, pos);
    pos = p1;
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 0) {
      const [v, p2] = readVarint(buf, pos);
      pos = p2;
      if (field === 1) status = v;
    } else if (wire === 2) {
      const [len, p2] = readVarint(buf, pos);
      pos = p2 + len;
    } else if (wire === 1) {
      pos += 8;
    } else if (wire === 5) {
      pos += 4;
    } else {
      throw new Error(`malformed HealthCheckResponse: wire type ${wire}`);
    }
    if (pos > buf.length) throw new Error("malformed HealthCheckResponse: truncated");
  }
  return STATUS_NAMES[status] ?? "UNKNOWN";
}

/** Encodes `HealthCheckResponse{status}` (used by tests that stand up a fake server). */
export function encodeHealthCheckResponse(status: HealthStatus): Uint8Array {
  const n = Number(Object.entries(STATUS_NAMES).find(([, name]) => name === status)![0]);
  return n === 0 ? new Uint8Array(0) : new Uint8Array([0x08, ...encodeVarint(n)]);
}

function encodeVarint(n: number): number[] {
  const out: number[] = [];
  while (n > 0x7f) {
    out.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return out;
}

function readVarint(buf: Uint8Array, pos: number): [number, number] {
  let result = 0;
  let mul = 1;
  for (let i = 0; i < 10; i++) {
    if (pos >= buf.length) throw new Error("malformed HealthCheckResponse: truncated varint");
    const b = buf[pos++];
    result += (b & 0x7f) * mul;
    if ((b & 0x80) === 0) return [result, pos];
    mul *= 128;
  }
  throw new Error("malformed HealthCheckResponse: varint too long");
}

/** `unix:///abs/path`, `unix:/abs/path` or a bare path, as a `unix://` target. */
export function unixTarget(address: string): string {
  if (address.startsWith("unix://")) return address;
  if (address.startsWith("unix:")) return `unix://${address.slice("unix:".length)}`;
  return `unix://${address}`;
}

/**
 * Asks the server at `address` whether it serves. Resolves with the status it reports; rejects
 * (with a one-line CliError) when nothing answers within `timeoutMs` or the RPC fails.
 */
export async function grpcHealthCheck(address: string, timeoutMs = 1000): Promise<HealthStatus> {
  const target = unixTarget(address);
  const channel = new GrpcChannel({ kind: "unix", path: target.slice("unix://".length) });
  try {
    const res = await channel.unary(CHECK_PATH, encodeHealthCheckRequest(), {}, { timeoutMs });
    return decodeHealthCheckResponse(res);
  } catch (err) {
    const why = err instanceof GrpcError ? err.details : (err as Error).message;
    throw new CliError(`health check of ${target} failed: ${why}`);
  } finally {
    channel.close();
  }
}
