/**
 * X.509 SVID verification (go-spiffe's x509svid.Verify): the leaf carries one SPIFFE ID, is not
 * a CA, every certificate is valid now, and the chain leads from the leaf through the given
 * intermediates to an authority in the bundle of the leaf's trust domain.
 */
import { Buffer } from "node:buffer";
import type { X509Certificate } from "node:crypto";
import type { X509Bundle, X509BundleSource } from "./bundle.ts";
import type { SpiffeId } from "./id.ts";
import { checkLeaf, SvidError } from "./svid.ts";
import { certInfo, describeCert } from "./x509.ts";

export class VerificationError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "VerificationError";
  }
}

/**
 * Chains with more certificates than this (the leaf, its intermediates, and a root if the peer
 * sends one) are refused before any signature check. SPIRE sends a leaf and at most a couple of
 * intermediates; Go's crypto/x509 has no such cap but bounds its work in other ways (below).
 */
export const MAX_CHAIN_CERTS = 8;

/**
 * Signature checks one verification may make (Go's crypto/x509 stops at 100 per chain build).
 * A real chain needs one per certificate on its path (the subject/key-identifier match picks
 * the issuer); only certificates that all name each other as issuer need more.
 */
export const MAX_SIGNATURE_CHECKS = 32;

function checkValidity(cert: X509Certificate, role: string, now: Date): void {
  const { notBefore, notAfter } = certInfo(cert);
  if (now.getTime() < notBefore.getTime()) {
    throw new VerificationError(
      `${role} is not valid before ${notBefore.toISOString()} (now ${now.toISOString()})`,
    );
  }
  if (now.getTime() > notAfter.getTime()) {
    throw new VerificationError(
      `${role} expired at ${notAfter.toISOString()} (now ${now.toISOString()})`,
    );
  }
}

const keyIds = new WeakMap<X509Certificate, string>();

/** The certificate's public key (SPKI DER, base64): what a signature check depends on. */
function keyIdOf(cert: X509Certificate): string {
  let k = keyIds.get(cert);
  if (k === undefined) {
    k = Buffer.from(cert.publicKey.export({ type: "spki", format: "der" })).toString("base64");
    keyIds.set(cert, k);
  }
  return k;
}

function isCa(cert: X509Certificate): boolean {
  try {
    return certInfo(cert).isCa;
  } catch {
    return false; // unparsable: never an issuer
  }
}

/**
 * Chains that failed verification, by their certificates' SHA-256 fingerprints, for callers
 * that cache successes (a TLS connection's chain, a JWS `x5c`): a refused chain presented again
 * is refused again without a signature check. An entry holds only while the bundle it was
 * judged against is the one in use (the same object: sources replace their bundles on every
 * update) and for `ttlMs` (validity changes with time). At most `maxEntries`, oldest dropped
 * first.
 */
export class FailedChainCache {
  readonly #entries = new Map<string, { bundle: X509Bundle; error: string; until: number }>();

  constructor(readonly maxEntries = 256, readonly ttlMs = 30_000) {}

  get size(): number {
    return this.#entries.size;
  }

  /** The error the chain failed with, if it failed against this bundle within the TTL. */
  lookup(chain: X509Certificate[], bundle: X509Bundle, nowMs: number): string | undefined {
    const key = FailedChainCache.#key(chain);
    const e = this.#entries.get(key);
    if (!e) return undefined;
    if (e.bundle !== bundle || nowMs > e.until || nowMs < e.until - this.ttlMs) {
      this.#entries.delete(key);
      return undefined;
    }
    return e.error;
  }

  add(chain: X509Certificate[], bundle: X509Bundle, nowMs: number, error: string): void {
    const key = FailedChainCache.#key(chain);
    this.#entries.delete(key);
    this.#entries.set(key, { bundle, error, until: nowMs + this.ttlMs });
    while (this.#entries.size > this.maxEntries) {
      this.#entries.delete(this.#entries.keys().next().value as string);
    }
  }

  static #key(chain: X509Certificate[]): string {
    return chain.map((c) => c.fingerprint256).join(",");
  }
}

export interface VerifyOptions {
  /** Remember path-building failures (and answer from them): see FailedChainCache. */
  failures?: FailedChainCache;
}

/** Result of a successful verification. */
export interface VerifiedSvid {
  id: SpiffeId;
  /** leaf, intermediates used, and the bundle authority that anchors the chain. */
  chain: X509Certificate[];
}

/**
 * Verifies `chain` (leaf first, then intermediates in any order) against the bundles and
 * returns the chain actually used. Throws VerificationError with the precise reason.
 */
export function verifyX509SvidChain(
  chain: X509Certificate[],
  bundles: X509BundleSource,
  now: Date = new Date(),
  opts: VerifyOptions = {},
): VerifiedSvid {
  if (chain.length === 0) throw new VerificationError("no certificates to verify");
  if (chain.length > MAX_CHAIN_CERTS) {
    throw new VerificationError(
      `a chain of more than ${MAX_CHAIN_CERTS} certificates (the leaf and its intermediates) is refused`,
    );
  }
  const leaf = chain[0];
  let id: SpiffeId;
  try {
    id = checkLeaf(leaf);
  } catch (err) {
    if (err instanceof SvidError) throw new VerificationError(err.message);
    throw err;
  }
  const bundle = bundles.getX509BundleForTrustDomain(id.trustDomain);
  if (!bundle) {
    throw new VerificationError(
      `no X.509 bundle for trust domain "${id.trustDomain.name}" (the trust domain of ${id})`,
    );
  }
  if (bundle.authorities.length === 0) {
    throw new VerificationError(`the X.509 bundle for "${id.trustDomain.name}" is empty`);
  }
  checkValidity(leaf, `leaf certificate ${id}`, now);
  const failed = opts.failures?.lookup(chain, bundle, now.getTime());
  if (failed !== undefined) throw new VerificationError(failed);
  try {
    return { id, chain: [leaf, ...buildPath(chain, bundle, id, now)] };
  } catch (err) {
    if (err instanceof VerificationError) {
      opts.failures?.add(chain, bundle, now.getTime(), err.message);
    }
    throw err;
  }
}

/**
 * Finds a path from the leaf (`chain[0]`) through the intermediates (`chain[1..]`, in any
 * order) to an authority of `bundle`: the intermediates and the path above the leaf, root last.
 *
 * Breadth-first over the graph "certificate -> a certificate that issued it" (the model is Go's
 * crypto/x509 path building, with its signature-check budget): each certificate is visited at
 * most once, so the first path found is a shortest one and there is no backtracking. Every
 * condition on a certificate (a CA, valid now) is its own, not its path's, so if any path
 * exists this finds one. Candidate issuers are those whose subject (and key identifier) the
 * child names as issuer; each signature check (child, issuer's key) is made at most once, and
 * at most MAX_SIGNATURE_CHECKS in all.
 */
function buildPath(
  chain: X509Certificate[],
  bundle: X509Bundle,
  id: SpiffeId,
  now: Date,
): X509Certificate[] {
  const leaf = chain[0];
  // Duplicates add nothing; the leaf (checked: not a CA) is never an issuer.
  const seen = new Set<string>([leaf.fingerprint256]);
  const intermediates: X509Certificate[] = [];
  for (const c of chain.slice(1)) {
    if (seen.has(c.fingerprint256)) continue;
    seen.add(c.fingerprint256);
    intermediates.push(c);
  }
  const signatures = new Map<string, boolean>();
  let checks = 0;
  // Whether `parent` issued `child` (index 0 the leaf, i + 1 intermediates[i]).
  const issued = (parent: X509Certificate, child: X509Certificate, childIdx: number): boolean => {
    try {
      if (!child.checkIssued(parent)) return false;
      const key = `${childIdx} ${keyIdOf(parent)}`;
      const known = signatures.get(key);
      if (known !== undefined) return known;
      if (checks >= MAX_SIGNATURE_CHECKS) {
        throw new VerificationError(
          `leaf certificate ${id}: no path to the X.509 bundle for "${id.trustDomain.name}" within ${MAX_SIGNATURE_CHECKS} signature checks (${chain.length} certificates that name each other as issuers)`,
        );
      }
      checks++;
      const ok = child.verify(parent.publicKey);
      signatures.set(key, ok);
      return ok;
    } catch (err) {
      if (err instanceof VerificationError) throw err;
      return false;
    }
  };

  interface Node {
    cert: X509Certificate;
    idx: number;
    /** The certificate this one issued (toward the leaf). */
    below?: Node;
  }
  const pathOf = (node: Node, root: X509Certificate): X509Certificate[] => {
    const up: X509Certificate[] = [root];
    for (let n: Node | undefined = node; n && n.idx !== 0; n = n.below) up.unshift(n.cert);
    return up;
  };
  const expired: string[] = [];
  const visited = new Set<number>([0]);
  const queue: Node[] = [{ cert: leaf, idx: 0 }];
  for (let q = 0; q < queue.length; q++) {
    const node = queue[q];
    for (const root of bundle.authorities) {
      if (!issued(root, node.cert, node.idx)) continue;
      try {
        checkValidity(
          root,
          `CA ${describeCert(root)} of the bundle for ${id.trustDomain.name}`,
          now,
        );
      } catch (err) {
        expired.push((err as Error).message);
        continue;
      }
      return pathOf(node, root);
    }
    for (let i = 0; i < intermediates.length; i++) {
      const inter = intermediates[i];
      if (visited.has(i + 1) || !isCa(inter) || !issued(inter, node.cert, node.idx)) continue;
      visited.add(i + 1);
      try {
        checkValidity(inter, `intermediate CA ${describeCert(inter)}`, now);
      } catch (err) {
        expired.push((err as Error).message);
        continue;
      }
      queue.push({ cert: inter, idx: i + 1, below: node });
    }
  }
  if (expired.length) throw new VerificationError(expired[0]);
  throw new VerificationError(
    `leaf certificate ${id} (issuer ${
      JSON.stringify(leaf.issuer.replace(/\n/g, ", "))
    }) is not issued under the X.509 bundle for "${id.trustDomain.name}" (${bundle.authorities.length} CA${
      bundle.authorities.length === 1 ? "" : "s"
    })`,
  );
}

/**
 * Verifies an X.509 SVID chain against the bundles and returns its SPIFFE ID.
 * `chain` is leaf first; `now` defaults to the current time.
 */
export function verifyX509Svid(
  chain: X509Certificate[],
  bundles: X509BundleSource,
  now: Date = new Date(),
): SpiffeId {
  return verifyX509SvidChain(chain, bundles, now).id;
}
