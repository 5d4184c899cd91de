/**
 * JWT-SVIDs and JWT bundles as the Workload API hands them out. The token is NOT verified here
 * (use `WorkloadApiClient.validateJwtSvid`); the claims are decoded for inspection only.
 */
import { Buffer } from "node:buffer";
import { parseSpiffeId, parseTrustDomain, type SpiffeId, type TrustDomain } from "./id.ts";

export class JwtError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "JwtError";
  }
}

export interface JwtSvid {
  id: SpiffeId;
  token: string;
  hint: string;
  audience: string[];
  /** From the `exp` claim. */
  expiry: Date;
  /** Unverified claims. */
  claims: Record<string, unknown>;
}

/** Decodes a JWT-SVID's payload (without verifying it) and checks `sub` and `exp`. */
export function parseJwtSvidInsecure(token: string, hint = ""): JwtSvid {
  const parts = token.split(".");
  if (parts.length !== 3) throw new JwtError(`JWT-SVID has ${parts.length} parts, expected 3`);
  let claims: Record<string, unknown>;
  try {
    claims = JSON.parse(Buffer.from(parts[1], "base64url").toString("utf8"));
  } catch {
    throw new JwtError("JWT-SVID payload is not base64url JSON");
  }
  if (typeof claims !== "object" || claims === null || Array.isArray(claims)) {
    throw new JwtError("JWT-SVID payload is not a JSON object");
  }
  if (typeof claims.sub !== "string") throw new JwtError("JWT-SVID has no 'sub' claim");
  const id = parseSpiffeId(claims.sub);
  if (typeof claims.exp !== "number") throw new JwtError("JWT-SVID has no numeric 'exp' claim");
  const aud = claims.aud;
  const audience = typeof aud === "string" ? [aud] : Array.isArray(aud) ? aud.map(String) : [];
  return { id, token, hint, audience, expiry: new Date(claims.exp * 1000), claims };
}

/** The JWT signing keys of one trust domain, as a JWKS document. */
export class JwtBundle {
  constructor(
    readonly trustDomain: TrustDomain,
    /** The parsed JWKS (`{"keys": [...]}`). */
    readonly jwks: { keys: Array<Record<string, unknown>> },
  ) {}

  static fromJwks(td: TrustDomain | string, json: Uint8Array | string): JwtBundle {
    const trust = typeof td === "string" ? parseTrustDomain(td) : td;
    let doc: unknown;
    try {
      doc = JSON.parse(typeof json === "string" ? json : new TextDecoder().decode(json));
    } catch {
      throw new JwtError(`JWT bundle for ${trust.name} is not JSON`);
    }
    const keys = (doc as { keys?: unknown })?.keys;
    if (!Array.isArray(keys)) {
      throw new JwtError(`JWT bundle for ${trust.name} has no "keys" array`);
    }
    return new JwtBundle(trust, { keys: keys as Array<Record<string, unknown>> });
  }
}
