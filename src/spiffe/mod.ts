/**
 * The SPIFFE identity layer: a JavaScript SPIFFE client modelled on go-spiffe. It knows nothing
 * about k8s4r.
 *
 * - `id.ts`: SpiffeId, TrustDomain, parseSpiffeId, parseTrustDomain
 * - `svid.ts`: X509Svid, parseX509Svid, parseX509SvidPem
 * - `bundle.ts`: X509Bundle, X509BundleSet
 * - `verify.ts`: verifyX509Svid
 * - `jws.ts`: JWS signatures with an X.509 SVID key and the chain in `x5c` (signJws, verifyJws)
 * - `tls.ts`: authorizers and node:tls mTLS options
 * - `workload/`: WorkloadApiClient, X509Source
 * - `source.ts`: the X509SvidSource interface other code depends on
 *
 * Test support (TestCa, FakeWorkloadApi) lives in `testing/` and is not re-exported here.
 */
export {
  MAX_SPIFFE_ID_LENGTH,
  parseSpiffeId,
  parseTrustDomain,
  SpiffeId,
  SpiffeIdError,
  TrustDomain,
  TrustDomainError,
  tryParseSpiffeId,
} from "./id.ts";
export { concatDer, DerError, splitDer } from "./der.ts";
export { type CertInfo, certInfo, type KeyUsage } from "./x509.ts";
export { decodePem, encodePem, PemError } from "./pem.ts";
export {
  checkLeaf,
  parseX509Svid,
  parseX509SvidPem,
  spiffeIdFromCert,
  SvidError,
  X509Svid,
} from "./svid.ts";
export { BundleError, X509Bundle, X509BundleSet, type X509BundleSource } from "./bundle.ts";
export {
  VerificationError,
  type VerifiedSvid,
  verifyX509Svid,
  verifyX509SvidChain,
} from "./verify.ts";
export {
  type FlattenedJws,
  isFlattenedJws,
  JWS_ALGORITHMS,
  type JwsAlgorithm,
  JwsError,
  type JwsHeader,
  MAX_X5C_CERTS,
  type ParsedJws,
  parseJws,
  signJws,
  type VerifiedJws,
  verifyJws,
  X5cChainCache,
} from "./jws.ts";
export { StaticX509Source, type X509SvidSource } from "./source.ts";
export {
  AuthorizationError,
  authorizeAny,
  authorizeId,
  authorizeIf,
  authorizeMemberOf,
  authorizeOneOf,
  authorizePeerCertificate,
  type Authorizer,
  authorizeTlsPeer,
  type MtlsClientOptions,
  mtlsClientOptions,
  type MtlsOptionsExtra,
  type MtlsServerOptions,
  mtlsServerOptions,
  peerChain,
} from "./tls.ts";
export { JwtBundle, JwtError, type JwtSvid, parseJwtSvidInsecure } from "./jwt.ts";
export {
  AddressError,
  ENDPOINT_SOCKET_ENV,
  parseWorkloadAddress,
  resolveWorkloadAddress,
  type WorkloadAddress,
} from "./workload/address.ts";
export { WorkloadApiError, type WorkloadErrorKind } from "./workload/errors.ts";
export {
  Backoff,
  type BackoffOptions,
  type CallOptions,
  type Watcher,
  WorkloadApiClient,
  type WorkloadApiClientOptions,
  type X509Context,
} from "./workload/client.ts";
export { X509Source, type X509SourceOptions } from "./workload/x509_source.ts";
