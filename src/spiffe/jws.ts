/**
 * JWS signatures (RFC 7515, Flattened JSON Serialization) made with an X.509 SVID's private key,
 * with the signer's certificate chain in the protected `x5c` header, verified against a SPIFFE
 * X.509 bundle. Generic: it knows X.509 SVIDs and bundles, nothing about what is signed.
 *
 * - The signature covers the EXACT payload bytes (base64url-encoded in the JWS) and the whole
 *   protected header (`alg`, `typ`, `x5c`): nothing is re-serialized or canonicalized, the
 *   verifier hands back the very bytes that were signed.
 * - Algorithms: ES256 (EC P-256 with SHA-256, what SPIRE issues by default) and ES384 (P-384,
 *   SPIRE's `ec-p384` workload key type). The algorithm must be the one the leaf key implies:
 *   an ES256 header on a P-384 key, `none`, HMAC or RSA are refused, so the header cannot pick
 *   a weaker algorithm than the key's. RSA SVIDs (SPIRE's `rsa-2048`) are not accepted.
 * - Signatures are the JWS form of ECDSA: r || s, fixed length (RFC 7518 §3.4), base64url.
 * - The chain is verified like any X.509 SVID (`verifyX509SvidChain`): leaf rules, validity,
 *   and a path to an authority of the bundle of the leaf's trust domain. The caller decides
 *   which signer SPIFFE IDs it accepts.
 */
import { Buffer } from "node:buffer";
import { type KeyObject, sign, verify, X509Certificate } from "node:crypto";
import type { X509Bundle, X509BundleSource } from "./bundle.ts";
import type { SpiffeId } from "./id.ts";
import type { X509Svid } from "./svid.ts";
import { FailedChainCache, MAX_CHAIN_CERTS, verifyX509SvidChain } from "./verify.ts";
import { certInfo } from "./x509.ts";

export const JWS_ALGORITHMS = ["ES256", "ES384"] as const;
export type JwsAlgorithm = typeof JWS_ALGORITHMS[number];

/** Chains longer than this (leaf included) are refused before any parsing: the verifier's cap. */
export const MAX_X5C_CERTS = MAX_CHAIN_CERTS;

const CURVES: Record<string, { alg: JwsAlgorithm; hash: string; size: number }> = {
  prime256v1: { alg: "ES256", hash: "sha256", size: 64 },
  secp384r1: { alg: "ES384", hash: "sha384", size: 96 },
};

/** A JWS that is malformed, badly signed, or whose signer's chain does not verify. */
export class JwsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "JwsError";
  }
}

/** The JWS Flattened JSON Serialization (RFC 7515 §7.2.2) with a protected header only. */
export interface FlattenedJws {
  protected: string;
  payload: string;
  signature: string;
}

export interface JwsHeader {
  alg: JwsAlgorithm;
  typ?: string;
  /** Standard base64 DER certificates, leaf first, then intermediates (never the root). */
  x5c: string[];
}

const B64URL = /^[A-Za-z0-9_-]*$/;
const B64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
const enc = new TextEncoder();

function b64url(bytes: Uint8Array | string): string {
  return Buffer.from(typeof bytes === "string" ? enc.encode(bytes) : bytes).toString("base64url");
}

function fromB64url(s: string, what: string): Uint8Array {
  // Buffer's decoder skips characters it does not know: check the alphabet first.
  if (!B64URL.test(s) || s.length % 4 === 1) {
    throw new JwsError(`${what}: expected base64url without padding`);
  }
  return new Uint8Array(Buffer.from(s, "base64url"));
}

function curveOf(key: KeyObject, what: string) {
  const curve = key.asymmetricKeyType === "ec" ? key.asymmetricKeyDetails?.namedCurve : undefined;
  const c = curve !== undefined ? CURVES[curve] : undefined;
  if (!c) {
    throw new JwsError(
      `${what} is ${key.asymmetricKeyType ?? "unknown"}${
        curve ? ` ${curve}` : ""
      }: only EC P-256 (ES256) and P-384 (ES384) keys sign`,
    );
  }
  return c;
}

/** The protected header of one SVID and `typ`, encoded once per SVID (they rotate rarely). */
const headerCache = new WeakMap<X509Svid, Map<string, { b64: string; alg: JwsAlgorithm }>>();

function protectedHeader(svid: X509Svid, typ: string | undefined) {
  let m = headerCache.get(svid);
  if (!m) headerCache.set(svid, m = new Map());
  const key = typ ?? "";
  let h = m.get(key);
  if (!h) {
    const { alg } = curveOf(svid.privateKey, `the private key of ${svid.id}`);
    const header: Record<string, unknown> = { alg };
    if (typ !== undefined) header.typ = typ;
    header.x5c = svid.certificates.map((c) => Buffer.from(c.raw).toString("base64"));
    h = { b64: b64url(JSON.stringify(header)), alg };
    m.set(key, h);
  }
  return h;
}

/**
 * Signs `payload` (the exact bytes) with the SVID's key. The protected header carries `alg`,
 * `typ` (when given) and the SVID's chain as `x5c`.
 */
export function signJws(payload: Uint8Array, svid: X509Svid, opts: { typ?: string } = {}) {
  const h = protectedHeader(svid, opts.typ);
  const hash = h.alg === "ES256" ? "sha256" : "sha384";
  const p = b64url(payload);
  const sig = sign(hash, enc.encode(`${h.b64}.${p}`), {
    key: svid.privateKey,
    dsaEncoding: "ieee-p1363",
  });
  const jws: FlattenedJws = { protected: h.b64, payload: p, signature: b64url(sig) };
  return jws;
}

/** A structurally valid JWS, not yet verified. */
export interface ParsedJws {
  header: JwsHeader;
  /** The payload bytes (unverified until `verifyJws` succeeds). */
  payload: Uint8Array;
  signingInput: Uint8Array;
  signature: Uint8Array;
}

/** True when `value` looks like a Flattened JSON JWS (it may still be malformed). */
export function isFlattenedJws(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value) &&
    "protected" in value && "signature" in value;
}

/**
 * Checks the structure of a Flattened JSON JWS (an already JSON-parsed object): members,
 * encodings, the header (`alg` one of JWS_ALGORITHMS, `x5c` 1..MAX_X5C_CERTS standard base64
 * strings, no `crit`). Throws JwsError.
 */
export function parseJws(value: unknown): ParsedJws {
  if (!isFlattenedJws(value)) {
    throw new JwsError("expected a JWS object with protected, payload and signature");
  }
  for (const k of Object.keys(value)) {
    if (k !== "protected" && k !== "payload" && k !== "signature") {
      // An unprotected "header" would be unsigned: one format, everything in `protected`.
      throw new JwsError(`unexpected JWS member ${JSON.stringify(k)}`);
    }
  }
  const { protected: prot, payload, signature } = value as Record<string, unknown>;
  if (typeof prot !== "string" || typeof payload !== "string" || typeof signature !== "string") {
    throw new JwsError("JWS members protected, payload and signature must be strings");
  }
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(
      fromB64url(prot, "JWS protected header"),
    ));
  } catch (err) {
    if (err instanceof JwsError) throw err;
    throw new JwsError(`JWS protected header is not UTF-8 JSON: ${(err as Error).message}`);
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) {
    throw new JwsError("JWS protected header is not a JSON object");
  }
  const h = header as Record<string, unknown>;
  if (h.crit !== undefined) {
    throw new JwsError("JWS header has crit: no extension is understood here");
  }
  if (!(JWS_ALGORITHMS as readonly unknown[]).includes(h.alg)) {
    throw new JwsError(
      `JWS alg ${JSON.stringify(h.alg)} is not accepted (expected ${JWS_ALGORITHMS.join(" or ")})`,
    );
  }
  if (h.typ !== undefined && typeof h.typ !== "string") {
    throw new JwsError("JWS typ must be a string");
  }
  const x5c = h.x5c;
  if (!Array.isArray(x5c) || x5c.length === 0 || x5c.length > MAX_X5C_CERTS) {
    throw new JwsError(
      `JWS x5c: expected 1..${MAX_X5C_CERTS} certificates (the signer's chain), got ${
        Array.isArray(x5c) ? x5c.length : typeof x5c
      }`,
    );
  }
  x5c.forEach((c, i) => {
    if (typeof c !== "string" || c.length === 0 || !B64.test(c)) {
      throw new JwsError(`JWS x5c[${i}]: expected standard base64 DER`);
    }
  });
  return {
    header: { alg: h.alg as JwsAlgorithm, typ: h.typ as string | undefined, x5c },
    payload: fromB64url(payload, "JWS payload"),
    signingInput: enc.encode(`${prot}.${payload}`),
    signature: fromB64url(signature, "JWS signature"),
  };
}

/** A JWS whose chain and signature verified. */
export interface VerifiedJws {
  /** The exact bytes that were signed. */
  payload: Uint8Array;
  header: JwsHeader;
  /** The SPIFFE ID of the signer's leaf certificate. */
  signer: SpiffeId;
}

interface CachedChain {
  signer: SpiffeId;
  key: KeyObject;
  /** The bundle the chain was verified against (a CA rotation brings a new bundle object). */
  bundle: X509Bundle;
  notBefore: number;
  notAfter: number;
}

/**
 * Remembers verified chains by their exact `x5c`. A hit is used only while the source still
 * hands out the very bundle object the chain was verified against (a bundle update, e.g. a CA
 * rotation, brings a new object) and every certificate of the verified path is valid; otherwise
 * the chain is verified afresh. Bounded: the oldest entry goes first. Chains that failed are
 * remembered too (`failures`), so a refused chain sent again costs no signature check.
 */
export class X5cChainCache {
  readonly #m = new Map<string, CachedChain>();
  readonly failures: FailedChainCache;
  constructor(readonly max = 64) {
    this.failures = new FailedChainCache(4 * max);
  }

  get size(): number {
    return this.#m.size;
  }

  lookup(key: string, bundles: X509BundleSource, now: number): CachedChain | undefined {
    const hit = this.#m.get(key);
    if (!hit) return undefined;
    if (
      bundles.getX509BundleForTrustDomain(hit.signer.trustDomain) !== hit.bundle ||
      now < hit.notBefore || now > hit.notAfter
    ) {
      this.#m.delete(key);
      return undefined;
    }
    return hit;
  }

  set(key: string, value: CachedChain): void {
    this.#m.delete(key);
    this.#m.set(key, value);
    while (this.#m.size > this.max) this.#m.delete(this.#m.keys().next().value!);
  }
}

function parseX5c(x5c: string[]): X509Certificate[] {
  return x5c.map((c, i) => {
    try {
      return new X509Certificate(Buffer.from(c, "base64"));
    } catch (err) {
      throw new JwsError(`JWS x5c[${i}] is not an X.509 certificate: ${(err as Error).message}`);
    }
  });
}

/**
 * Verifies the signer's chain (`x5c`) against `bundles` and the signature over the protected
 * header and payload. Throws JwsError naming the first thing that is wrong.
 */
export function verifyJws(
  jws: ParsedJws,
  bundles: X509BundleSource,
  opts: { now?: Date; cache?: X5cChainCache } = {},
): VerifiedJws {
  const now = opts.now ?? new Date();
  const cacheKey = jws.header.x5c.join(".");
  let chain = opts.cache?.lookup(cacheKey, bundles, now.getTime());
  if (!chain) {
    const certs = parseX5c(jws.header.x5c);
    let verified;
    try {
      verified = verifyX509SvidChain(certs, bundles, now, { failures: opts.cache?.failures });
    } catch (err) {
      // VerificationError, or a DerError from a certificate too odd to read: refused alike.
      throw new JwsError(`the signer's chain does not verify: ${(err as Error).message}`);
    }
    const infos = verified.chain.map((c) => certInfo(c));
    chain = {
      signer: verified.id,
      key: certs[0].publicKey,
      bundle: bundles.getX509BundleForTrustDomain(verified.id.trustDomain)!,
      notBefore: Math.max(...infos.map((i) => i.notBefore.getTime())),
      notAfter: Math.min(...infos.map((i) => i.notAfter.getTime())),
    };
    opts.cache?.set(cacheKey, chain);
  }
  const c = curveOf(chain.key, `the signer's key (${chain.signer})`);
  if (c.alg !== jws.header.alg) {
    throw new JwsError(
      `JWS alg ${jws.header.alg} does not match the signer's key (${c.alg} for its curve)`,
    );
  }
  if (jws.signature.byteLength !== c.size) {
    throw new JwsError(
      `JWS signature is ${jws.signature.byteLength} bytes, expected ${c.size} for ${c.alg}`,
    );
  }
  let ok = false;
  try {
    ok = verify(
      c.hash,
      jws.signingInput,
      { key: chain.key, dsaEncoding: "ieee-p1363" },
      jws.signature,
    );
  } catch {
    ok = false;
  }
  if (!ok) throw new JwsError(`JWS signature does not verify with the key of ${chain.signer}`);
  return { payload: jws.payload, header: jws.header, signer: chain.signer };
}
