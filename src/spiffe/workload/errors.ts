/** Typed Workload API errors, each with a message that names the cause. */
import type { WorkloadAddress } from "./address.ts";

export type WorkloadErrorKind =
  /** The unix socket does not exist (agent not running, wrong path). */
  | "socket-missing"
  /** The socket exists but this process may not connect to it. */
  | "socket-permission"
  /** PermissionDenied "no identity issued": no registration entry matches the caller. */
  | "no-identity"
  /** Another PermissionDenied. */
  | "permission-denied"
  /** InvalidArgument "security header missing from request". Fatal. */
  | "missing-header"
  /** Another InvalidArgument. Fatal. */
  | "invalid-argument"
  /** Nobody answers (refused, reset, stream ended). Retried by watchers. */
  | "unavailable"
  | "timeout"
  | "cancelled"
  /** A response that cannot be decoded or holds invalid SVIDs/bundles. */
  | "bad-response"
  | "other";

export class WorkloadApiError extends Error {
  constructor(
    readonly kind: WorkloadErrorKind,
    message: string,
    /** gRPC status code when the error came from gRPC. */
    readonly grpcCode?: number,
  ) {
    super(message);
    this.name = "WorkloadApiError";
  }

  /**
   * Watchers stop for good on these (as go-spiffe does). A CANCELLED status sent by the server
   * (e.g. an agent shutting down) is retried; our own cancellation stops watchers through their
   * abort signal instead.
   */
  get fatal(): boolean {
    return this.kind === "missing-header" || this.kind === "invalid-argument";
  }
}

interface GrpcLikeError {
  code?: number;
  details?: string;
  message?: string;
}

// gRPC status codes used below (from @grpc/grpc-js `status`).
const CANCELLED = 1;
const INVALID_ARGUMENT = 3;
const DEADLINE_EXCEEDED = 4;
const PERMISSION_DENIED = 7;
const UNAVAILABLE = 14;

function where(addr: WorkloadAddress): string {
  return addr.kind === "unix" ? `unix://${addr.path}` : `tcp://${addr.host}:${addr.port}`;
}

/** Turns a gRPC error into a WorkloadApiError whose message names the cause. */
export function mapGrpcError(err: unknown, addr: WorkloadAddress): WorkloadApiError {
  if (err instanceof WorkloadApiError) return err;
  const e = (err ?? {}) as GrpcLikeError;
  const details = e.details ?? e.message ?? String(err);
  const code = e.code;
  const at = where(addr);
  switch (code) {
    case INVALID_ARGUMENT:
      if (/security header missing/i.test(details)) {
        return new WorkloadApiError(
          "missing-header",
          `the Workload API at ${at} refused the call: security header missing from request (InvalidArgument); the client must send the metadata 'workload.spiffe.io: true'`,
          code,
        );
      }
      return new WorkloadApiError(
        "invalid-argument",
        `the Workload API at ${at} refused the call: ${details} (InvalidArgument)`,
        code,
      );
    case PERMISSION_DENIED:
      if (/no identity issued/i.test(details)) {
        return new WorkloadApiError(
          "no-identity",
          `the Workload API at ${at} issued no identity to this process (PermissionDenied: no identity issued); check that a registration entry's selectors match this workload`,
          code,
        );
      }
      return new WorkloadApiError(
        "permission-denied",
        `the Workload API at ${at} denied the call: ${details} (PermissionDenied)`,
        code,
      );
    case UNAVAILABLE:
      if (/ENOENT|no such file/i.test(details)) {
        return socketMissing(addr, code);
      }
      if (/EACCES|EPERM|permission denied/i.test(details)) {
        return socketPermission(addr, code);
      }
      if (/ECONNREFUSED/i.test(details) && addr.kind === "unix") {
        return new WorkloadApiError(
          "unavailable",
          `nothing listens on the Workload API socket ${addr.path} (connection refused: a stale socket? is the SPIRE agent running?)`,
          code,
        );
      }
      return new WorkloadApiError(
        "unavailable",
        `the Workload API at ${at} is unavailable: ${details}`,
        code,
      );
    case DEADLINE_EXCEEDED:
      return new WorkloadApiError(
        "timeout",
        `the Workload API at ${at} did not answer in time`,
        code,
      );
    case CANCELLED:
      return new WorkloadApiError(
        "cancelled",
        `the call to the Workload API at ${at} was cancelled`,
        code,
      );
    default:
      return new WorkloadApiError(
        "other",
        `the Workload API at ${at} failed: ${details}${
          code !== undefined ? ` (gRPC code ${code})` : ""
        }`,
        code,
      );
  }
}

export function socketMissing(addr: WorkloadAddress, code?: number): WorkloadApiError {
  const path = addr.kind === "unix" ? addr.path : where(addr);
  return new WorkloadApiError(
    "socket-missing",
    `the Workload API socket ${path} does not exist (is the SPIRE agent running? is the path right?)`,
    code,
  );
}

export function socketPermission(addr: WorkloadAddress, code?: number): WorkloadApiError {
  const path = addr.kind === "unix" ? addr.path : where(addr);
  return new WorkloadApiError(
    "socket-permission",
    `permission denied on the Workload API socket ${path} (this user may not open it or its directory)`,
    code,
  );
}
