/**
 * node:tls options for mTLS between SPIFFE workloads (go-spiffe's `tlsconfig`): present the
 * source's SVID, trust its bundle, and authorize the peer by the SPIFFE ID in its URI SAN
 * instead of by hostname.
 *
 * The options are a SNAPSHOT of the source's current SVID and bundle: node:tls copies `key`,
 * `cert` and `ca` when a context is created. Rebuild them (and reconnect, or call
 * `server.setSecureContext(...)`) from `source.onUpdate(...)` when the SVID rotates.
 */
import { Buffer } from "node:buffer";
import { X509Certificate } from "node:crypto";
import type { PeerCertificate, TLSSocket } from "node:tls";
import { parseTrustDomain, type SpiffeId, type TrustDomain } from "./id.ts";
import type { X509SvidSource } from "./source.ts";
import { MAX_CHAIN_CERTS, verifyX509SvidChain } from "./verify.ts";

/** Decides whether a verified peer SPIFFE ID may talk to us: undefined = yes, an Error = no. */
export type Authorizer = (id: SpiffeId) => Error | undefined;

export class AuthorizationError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "AuthorizationError";
  }
}

/** Authorizes exactly one SPIFFE ID. */
export function authorizeId(expected: SpiffeId | string): Authorizer {
  const want = expected.toString();
  return (id) =>
    id.toString() === want
      ? undefined
      : new AuthorizationError(`unexpected peer ID ${id}: expected ${want}`);
}

/** Authorizes any of the given SPIFFE IDs. */
export function authorizeOneOf(...expected: Array<SpiffeId | string>): Authorizer {
  const want = new Set(expected.map(String));
  return (id) =>
    want.has(id.toString())
      ? undefined
      : new AuthorizationError(`unexpected peer ID ${id}: expected one of ${[...want].join(", ")}`);
}

/** Authorizes any peer with a valid SVID from a trusted bundle. */
export function authorizeAny(): Authorizer {
  return () => undefined;
}

/** Authorizes any SPIFFE ID in the trust domain. */
export function authorizeMemberOf(td: TrustDomain | string): Authorizer {
  const name = typeof td === "string" ? parseTrustDomain(td).name : td.name;
  return (id) =>
    id.memberOf(name) ? undefined : new AuthorizationError(
      `unexpected peer ID ${id}: expected a member of trust domain ${name}`,
    );
}

/** Authorizes by a predicate (e.g. a path prefix); `what` describes it in the error. */
export function authorizeIf(what: string, ok: (id: SpiffeId) => boolean): Authorizer {
  return (
    id,
  ) => (ok(id) ? undefined : new AuthorizationError(`unexpected peer ID ${id}: expected ${what}`));
}

/**
 * Leaf then intermediates from a node:tls peer certificate (detailed form when available). A
 * peer chooses how many certificates it sends: at most MAX_CHAIN_CERTS + 1 are taken, one more
 * than the verifier accepts, so that an over-long chain is refused by it (with its message)
 * rather than cut to a prefix that might verify.
 */
export function peerChain(cert: PeerCertificate): X509Certificate[] {
  if (!cert || !cert.raw) throw new AuthorizationError("peer presented no certificate");
  const chain = [new X509Certificate(cert.raw)];
  const seen = new Set<string>([Buffer.from(cert.raw).toString("base64")]);
  // deno-lint-ignore no-explicit-any -- issuerCertificate exists only on the detailed form.
  let cur = (cert as any).issuerCertificate as PeerCertificate | undefined;
  while (cur && cur.raw && chain.length <= MAX_CHAIN_CERTS) {
    const key = Buffer.from(cur.raw).toString("base64");
    if (seen.has(key)) break; // the self-signed root points to itself
    seen.add(key);
    chain.push(new X509Certificate(cur.raw));
    // deno-lint-ignore no-explicit-any
    cur = (cur as any).issuerCertificate as PeerCertificate | undefined;
  }
  return chain;
}

/**
 * Verifies a peer certificate as an X.509 SVID against the source's bundles and runs the
 * authorizer. Returns the peer's SPIFFE ID or throws (VerificationError/AuthorizationError).
 */
export function authorizePeerCertificate(
  cert: PeerCertificate,
  source: Pick<X509SvidSource, "getX509BundleForTrustDomain">,
  authorizer: Authorizer,
  now?: Date,
): SpiffeId {
  const { id } = verifyX509SvidChain(peerChain(cert), source, now);
  const err = authorizer(id);
  if (err) throw err;
  return id;
}

/** For a server's `secureConnection` handler: authorizes the client or returns the error. */
export function authorizeTlsPeer(
  socket: TLSSocket,
  source: Pick<X509SvidSource, "getX509BundleForTrustDomain">,
  authorizer: Authorizer,
): { id?: SpiffeId; error?: Error } {
  try {
    const cert = socket.getPeerCertificate(true);
    if (!cert || !cert.raw) {
      return { error: new AuthorizationError("peer presented no certificate") };
    }
    return { id: authorizePeerCertificate(cert, source, authorizer) };
  } catch (err) {
    return { error: err as Error };
  }
}

export interface MtlsOptionsExtra {
  /** Trust domains whose bundles are also trusted (federation). The SVID's own is always in. */
  federatedTrustDomains?: Array<string | TrustDomain>;
}

function pems(source: X509SvidSource, extra: MtlsOptionsExtra) {
  const svid = source.getX509Svid();
  const tds = [svid.id.trustDomain, ...(extra.federatedTrustDomains ?? [])];
  const ca: string[] = [];
  for (const td of tds) {
    const b = source.getX509BundleForTrustDomain(td);
    if (b) ca.push(b.toPem());
    else if (td === svid.id.trustDomain) {
      throw new AuthorizationError(`no X.509 bundle for trust domain ${svid.id.trustDomain.name}`);
    }
  }
  return { key: svid.privateKeyPem(), cert: svid.certChainPem(), ca: ca.join("") };
}

export interface MtlsClientOptions {
  key: string;
  cert: string;
  ca: string;
  rejectUnauthorized: true;
  checkServerIdentity: (host: string, cert: PeerCertificate) => Error | undefined;
}

/**
 * Client options: present our SVID, trust the bundle, and accept the server only if its
 * certificate is a valid SVID whose ID the authorizer accepts. The hostname is ignored.
 * A snapshot: rebuild on `source.onUpdate`.
 */
export function mtlsClientOptions(
  source: X509SvidSource,
  authorizer: Authorizer,
  extra: MtlsOptionsExtra = {},
): MtlsClientOptions {
  return {
    ...pems(source, extra),
    rejectUnauthorized: true,
    checkServerIdentity: (_host, cert) => {
      try {
        authorizePeerCertificate(cert, source, authorizer);
        return undefined;
      } catch (err) {
        return err as Error;
      }
    },
  };
}

export interface MtlsServerOptions {
  key: string;
  cert: string;
  ca: string;
  requestCert: true;
  rejectUnauthorized: true;
  /**
   * Verifies and authorizes a connected client; call it from `secureConnection` and destroy
   * the socket when it returns an error. (node:tls ignores this extra option.)
   */
  authorizePeer: (socket: TLSSocket) => { id?: SpiffeId; error?: Error };
}

/**
 * Server options: present our SVID and require a client certificate chaining to the bundle.
 * node:tls has no per-handshake identity hook on servers, so the client's SPIFFE ID is
 * authorized in `secureConnection` with the returned `authorizePeer(socket)`. A snapshot:
 * rebuild and `server.setSecureContext()` on `source.onUpdate`.
 */
export function mtlsServerOptions(
  source: X509SvidSource,
  authorizer: Authorizer,
  extra: MtlsOptionsExtra = {},
): MtlsServerOptions {
  return {
    ...pems(source, extra),
    requestCert: true,
    rejectUnauthorized: true,
    authorizePeer: (socket) => authorizeTlsPeer(socket, source, authorizer),
  };
}
