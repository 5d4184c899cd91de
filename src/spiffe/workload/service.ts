/**
 * The SpiffeWorkloadAPI gRPC service definition for @grpc/grpc-js, with the embedded codec.
 * The proto has no package, so the paths are `/SpiffeWorkloadAPI/<Method>`.
 *
 * Responses are (de)serialized as raw bytes on the client side and decoded by the caller, so
 * that one undecodable message in a stream is reported and skipped instead of killing the
 * stream (grpc-js ends a call when its deserializer throws).
 */
import { Buffer } from "node:buffer";
import type { ServiceDefinition } from "@grpc/grpc-js";

/** The metadata key every Workload API call must carry, with value "true". */
export const SECURITY_HEADER = "workload.spiffe.io";

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
