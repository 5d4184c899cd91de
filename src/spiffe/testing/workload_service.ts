/**
 * Test only: the SpiffeWorkloadAPI gRPC service definition for @grpc/grpc-js, which the fake
 * Workload API serves (and tests use as an independent client). Production code speaks gRPC
 * with `../workload/grpc.ts`. The proto has no package, so the paths are
 * `/SpiffeWorkloadAPI/<Method>`. Messages are raw bytes; encode/decode with `proto.ts`.
 */
import { Buffer } from "node:buffer";
import type { ServiceDefinition } from "@grpc/grpc-js";

export { SECURITY_HEADER } from "../workload/client.ts";

const raw = {
  serialize: (b: Uint8Array) => Buffer.from(b.buffer, b.byteOffset, b.byteLength),
  deserialize: (b: Buffer) => new Uint8Array(b),
};

function method(name: string, responseStream: boolean) {
  return {
    path: `/SpiffeWorkloadAPI/${name}`,
    requestStream: false,
    responseStream,
    requestSerialize: raw.serialize,
    requestDeserialize: raw.deserialize,
    responseSerialize: raw.serialize,
    responseDeserialize: raw.deserialize,
    originalName: name,
  };
}

/** Every method carries raw bytes; encode/decode with `proto.ts`. */
export const workloadServiceDefinition = {
  FetchX509SVID: method("FetchX509SVID", true),
  FetchX509Bundles: method("FetchX509Bundles", true),
  FetchJWTSVID: method("FetchJWTSVID", false),
  FetchJWTBundles: method("FetchJWTBundles", true),
  ValidateJWTSVID: method("ValidateJWTSVID", false),
} satisfies ServiceDefinition;
