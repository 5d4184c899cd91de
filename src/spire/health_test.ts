import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import * as grpc from "@grpc/grpc-js";
import {
  decodeHealthCheckResponse,
  encodeHealthCheckRequest,
  encodeHealthCheckResponse,
  grpcHealthCheck,
  type HealthStatus,
  unixTarget,
} from "./health.ts";

Deno.test("health codec: request and response round trip", () => {
  assert.deepEqual(encodeHealthCheckRequest(), new Uint8Array(0));
  assert.deepEqual(encodeHealthCheckRequest("x"), new Uint8Array([0x0a, 1, 0x78]));
  for (const s of ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"] as HealthStatus[]) {
    assert.equal(decodeHealthCheckResponse(encodeHealthCheckResponse(s)), s);
  }
  // Unknown fields are skipped: field 2 (bytes "ab") before status = SERVING.
  assert.equal(
    decodeHealthCheckResponse(new Uint8Array([0x12, 2, 0x61, 0x62, 0x08, 1])),
    "SERVING",
  );
  assert.throws(() => decodeHealthCheckResponse(new Uint8Array([0x08])), /truncated/);
  assert.throws(() => decodeHealthCheckResponse(new Uint8Array([0x12, 5, 1])), /truncated/);
});

Deno.test("unixTarget normalises addresses", () => {
  assert.equal(unixTarget("/tmp/a.sock"), "unix:///tmp/a.sock");
  assert.equal(unixTarget("unix:/tmp/a.sock"), "unix:///tmp/a.sock");
  assert.equal(unixTarget("unix:///tmp/a.sock"), "unix:///tmp/a.sock");
});

Deno.test({
  name: "grpcHealthCheck asks grpc.health.v1.Health/Check over a unix socket",
  // grpc-js keeps internal timers alive briefly after close.
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-" });
    const sock = `${dir}/h.sock`;
    const server = new grpc.Server();
    let status: HealthStatus = "NOT_SERVING";
    let seenRequest: Uint8Array | undefined;
    server.addService({
      Check: {
        path: "/grpc.health.v1.Health/Check",
        requestStream: false,
        responseStream: false,
        requestSerialize: (v: Uint8Array) => Buffer.from(v),
        requestDeserialize: (b: Buffer) => new Uint8Array(b),
        responseSerialize: (v: Uint8Array) => Buffer.from(v),
        responseDeserialize: (b: Buffer) => new Uint8Array(b),
      },
    }, {
      Check: (
        call: grpc.ServerUnaryCall<Uint8Array, Uint8Array>,
        cb: grpc.sendUnaryData<Uint8Array>,
      ) => {
        seenRequest = call.request;
        cb(null, encodeHealthCheckResponse(status));
      },
    });
    try {
      await new Promise<void>((res, rej) =>
        server.bindAsync(
          `unix://${sock}`,
          grpc.ServerCredentials.createInsecure(),
          (e) => e ? rej(e) : res(),
        )
      );
      assert.equal(await grpcHealthCheck(`unix://${sock}`), "NOT_SERVING");
      assert.deepEqual(seenRequest, new Uint8Array(0));
      status = "SERVING";
      assert.equal(await grpcHealthCheck(sock), "SERVING");
    } finally {
      await new Promise<void>((res) => server.tryShutdown(() => res()));
    }
    // Nothing listens any more: a clear rejection, not a hang.
    await assert.rejects(grpcHealthCheck(`unix://${sock}`, 500), /health check of unix:\/\//);
    await Deno.remove(dir, { recursive: true });
  },
});
