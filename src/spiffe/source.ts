/**
 * The small interface code outside the SPIFFE layer depends on, instead of gRPC: something that
 * always holds the newest X.509 SVID and bundles, and says when they change.
 */
import type { X509Bundle, X509BundleSet, X509BundleSource } from "./bundle.ts";
import type { TrustDomain } from "./id.ts";
import type { X509Svid } from "./svid.ts";

export interface X509SvidSource extends X509BundleSource {
  /** The newest SVID. Never stale by more than one update. */
  getX509Svid(): X509Svid;
  getX509BundleForTrustDomain(td: string | TrustDomain): X509Bundle | undefined;
  /**
   * Calls `listener` after every rotation (SVID or bundle change). Returns the unsubscribe
   * function. Listeners must not throw; errors they throw are swallowed.
   */
  onUpdate(listener: () => void): () => void;
}

/**
 * A source that never changes until `set()` is called: for tests, and for SVIDs loaded from
 * files. `set()` fires the update listeners synchronously.
 */
export class StaticX509Source implements X509SvidSource {
  #svid: X509Svid;
  #bundles: X509BundleSet;
  readonly #listeners = new Set<() => void>();

  constructor(svid: X509Svid, bundles: X509BundleSet) {
    this.#svid = svid;
    this.#bundles = bundles;
  }

  getX509Svid(): X509Svid {
    return this.#svid;
  }

  getX509BundleForTrustDomain(td: string | TrustDomain): X509Bundle | undefined {
    return this.#bundles.get(td);
  }

  get bundles(): X509BundleSet {
    return this.#bundles;
  }

  set(svid: X509Svid, bundles: X509BundleSet = this.#bundles): void {
    this.#svid = svid;
    this.#bundles = bundles;
    for (const l of [...this.#listeners]) {
      try {
        l();
      } catch {
        // A listener's failure must not stop the others.
      }
    }
  }

  onUpdate(listener: () => void): () => void {
    this.#listeners.add(listener);
    return () => void this.#listeners.delete(listener);
  }
}
