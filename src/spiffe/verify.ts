/**
 * X.509 SVID verification (go-spiffe's x509svid.Verify): the leaf carries one SPIFFE ID, is not
 * a CA, every certificate is valid now, and the chain leads from the leaf through the given
 * intermediates to an authority in the bundle of the leaf's trust domain.
 */
import type { X509Certificate } from "node:crypto";
import type { X509BundleSource } from "./bundle.ts";
import type { SpiffeId } from "./id.ts";
import { checkLeaf, SvidError } from "./svid.ts";
import { certInfo, describeCert } from "./x509.ts";

export class VerificationError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "VerificationError";
  }
}

/** Chains longer than this are refused (SPIRE uses at most a couple of intermediates). */
const MAX_CHAIN_DEPTH = 8;

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

function issued(parent: X509Certificate, child: X509Certificate): boolean {
  try {
    return child.checkIssued(parent) && child.verify(parent.publicKey);
  } catch {
    return false;
  }
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
): VerifiedSvid {
  if (chain.length === 0) throw new VerificationError("no certificates to verify");
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
  const intermediates = chain.slice(1);

  // Depth-first search from the leaf up; intermediates may appear in any order.
  const expiredAnchors: string[] = [];
  const search = (cert: X509Certificate, used: Set<X509Certificate>): X509Certificate[] | null => {
    if (used.size > MAX_CHAIN_DEPTH) return null;
    for (const root of bundle.authorities) {
      if (issued(root, cert)) {
        try {
          checkValidity(
            root,
            `CA ${describeCert(root)} of the bundle for ${id.trustDomain.name}`,
            now,
          );
        } catch (err) {
          expiredAnchors.push((err as Error).message);
          continue;
        }
        return [root];
      }
    }
    for (const inter of intermediates) {
      if (used.has(inter) || !issued(inter, cert)) continue;
      const info = certInfo(inter);
      if (!info.isCa) continue;
      try {
        checkValidity(inter, `intermediate CA ${describeCert(inter)}`, now);
      } catch (err) {
        expiredAnchors.push((err as Error).message);
        continue;
      }
      used.add(inter);
      const rest = search(inter, used);
      if (rest) return [inter, ...rest];
      used.delete(inter);
    }
    return null;
  };
  const path = search(leaf, new Set());
  if (!path) {
    if (expiredAnchors.length) throw new VerificationError(expiredAnchors[0]);
    throw new VerificationError(
      `leaf certificate ${id} (issuer ${
        JSON.stringify(leaf.issuer.replace(/\n/g, ", "))
      }) is not issued under the X.509 bundle for "${id.trustDomain.name}" (${bundle.authorities.length} CA${
        bundle.authorities.length === 1 ? "" : "s"
      })`,
    );
  }
  return { id, chain: [leaf, ...path] };
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
