/** X.509 bundles: the CA certificates (authorities) trusted for one trust domain. */
import { Buffer } from "node:buffer";
import { X509Certificate } from "node:crypto";
import { concatDer, DerError, splitDer } from "./der.ts";
import { parseTrustDomain, TrustDomain } from "./id.ts";
import { decodePemOfType, encodePem, PemError } from "./pem.ts";

export class BundleError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BundleError";
  }
}

/** Anything that can return the bundle for a trust domain (a set, a source). */
export interface X509BundleSource {
  getX509BundleForTrustDomain(td: string | TrustDomain): X509Bundle | undefined;
}

export class X509Bundle {
  readonly trustDomain: TrustDomain;
  readonly authorities: readonly X509Certificate[];

  constructor(trustDomain: TrustDomain | string, authorities: X509Certificate[]) {
    this.trustDomain = typeof trustDomain === "string"
      ? parseTrustDomain(trustDomain)
      : trustDomain;
    this.authorities = Object.freeze([...authorities]);
  }

  /** Parses concatenated DER CA certificates (the Workload API's bundle form). */
  static fromDer(trustDomain: TrustDomain | string, der: Uint8Array): X509Bundle {
    const td = typeof trustDomain === "string" ? parseTrustDomain(trustDomain) : trustDomain;
    const what = `X.509 bundle for ${td.name}`;
    let parts: Uint8Array[];
    try {
      parts = splitDer(der, what);
    } catch (err) {
      if (err instanceof DerError) throw new BundleError(err.message);
      throw err;
    }
    return new X509Bundle(td, parts.map((p, i) => parseCert(p, what, i)));
  }

  /** Parses PEM CA certificates (`bundle.pem`, `spire-server bundle show -format pem`). */
  static fromPem(trustDomain: TrustDomain | string, pem: string): X509Bundle {
    const td = typeof trustDomain === "string" ? parseTrustDomain(trustDomain) : trustDomain;
    const what = `X.509 bundle for ${td.name}`;
    let ders: Uint8Array[];
    try {
      ders = decodePemOfType(pem, "CERTIFICATE", what);
    } catch (err) {
      if (err instanceof PemError) throw new BundleError(err.message);
      throw err;
    }
    return new X509Bundle(td, ders.map((p, i) => parseCert(p, what, i)));
  }

  toPem(): string {
    return this.authorities.map((c) => encodePem("CERTIFICATE", new Uint8Array(c.raw))).join("");
  }

  toDer(): Uint8Array {
    return concatDer(this.authorities.map((c) => new Uint8Array(c.raw)));
  }

  hasAuthority(cert: X509Certificate): boolean {
    const raw = Buffer.from(cert.raw);
    return this.authorities.some((a) => Buffer.from(a.raw).equals(raw));
  }

  /** Same trust domain and the same authorities in the same order. */
  equals(other: X509Bundle): boolean {
    return this.trustDomain.equals(other.trustDomain) &&
      this.authorities.length === other.authorities.length &&
      this.authorities.every((a, i) =>
        Buffer.from(a.raw).equals(Buffer.from(other.authorities[i].raw))
      );
  }

  getX509BundleForTrustDomain(td: string | TrustDomain): X509Bundle | undefined {
    return this.trustDomain.equals(normalizeTd(td)) ? this : undefined;
  }
}

function parseCert(der: Uint8Array, what: string, i: number): X509Certificate {
  try {
    return new X509Certificate(Buffer.from(der));
  } catch (err) {
    throw new BundleError(
      `${what}: certificate ${i + 1} cannot be parsed: ${(err as Error).message}`,
    );
  }
}

/** Accepts `example.org`, `spiffe://example.org` or a TrustDomain; returns the bare name. */
function normalizeTd(td: string | TrustDomain): string {
  return typeof td === "string" ? parseTrustDomain(td).name : td.name;
}

/** At most one bundle per trust domain; adding one for a known trust domain replaces it. */
export class X509BundleSet implements X509BundleSource {
  readonly #bundles = new Map<string, X509Bundle>();

  constructor(bundles: Iterable<X509Bundle> = []) {
    for (const b of bundles) this.add(b);
  }

  add(bundle: X509Bundle): void {
    this.#bundles.set(bundle.trustDomain.name, bundle);
  }

  remove(td: string | TrustDomain): boolean {
    return this.#bundles.delete(normalizeTd(td));
  }

  get(td: string | TrustDomain): X509Bundle | undefined {
    return this.#bundles.get(normalizeTd(td));
  }

  has(td: string | TrustDomain): boolean {
    return this.#bundles.has(normalizeTd(td));
  }

  getX509BundleForTrustDomain(td: string | TrustDomain): X509Bundle | undefined {
    return this.get(td);
  }

  /** Bundles sorted by trust domain name. */
  bundles(): X509Bundle[] {
    return [...this.#bundles.values()].sort((a, b) =>
      a.trustDomain.name < b.trustDomain.name ? -1 : 1
    );
  }

  get size(): number {
    return this.#bundles.size;
  }

  equals(other: X509BundleSet): boolean {
    if (this.size !== other.size) return false;
    return this.bundles().every((b) => {
      const o = other.get(b.trustDomain);
      return o !== undefined && b.equals(o);
    });
  }
}
