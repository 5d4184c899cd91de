/**
 * SPIFFE IDs and trust domains, validated by the rules of the SPIFFE-ID specification
 * (https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md):
 *
 * - the scheme is exactly `spiffe://` (lowercase);
 * - the trust domain is non-empty and uses only `a-z 0-9 . - _` (no uppercase, no port, no
 *   userinfo);
 * - the path is empty or a sequence of `/segment`s; segments are non-empty, are not `.` or `..`,
 *   and use only `A-Z a-z 0-9 . - _` (no percent-encoding); there is no trailing slash;
 * - there is no query or fragment;
 * - the whole ID is at most 2048 bytes.
 *
 * Every broken rule has its own `SpiffeIdError` message, which always quotes the input.
 */

export const SPIFFE_SCHEME = "spiffe://";
/** The specification's maximum length of a SPIFFE ID, in bytes. */
export const MAX_SPIFFE_ID_LENGTH = 2048;
/** Maximum length of a trust domain name (DNS label limit used by go-spiffe and SPIRE). */
export const MAX_TRUST_DOMAIN_LENGTH = 255;

/** A SPIFFE ID or trust domain that breaks a rule of the specification. */
export class SpiffeIdError extends Error {
  constructor(readonly input: string, readonly reason: string) {
    super(`invalid SPIFFE ID ${JSON.stringify(truncate(input))}: ${reason}`);
    this.name = "SpiffeIdError";
  }
}

/** A trust domain name that breaks a rule. */
export class TrustDomainError extends SpiffeIdError {
  constructor(input: string, reason: string) {
    super(input, reason);
    this.message = `invalid trust domain ${JSON.stringify(truncate(input))}: ${reason}`;
    this.name = "TrustDomainError";
  }
}

function truncate(s: string): string {
  return s.length > 120 ? s.slice(0, 117) + "..." : s;
}

const TD_CHAR = /^[a-z0-9._-]$/;
const PATH_CHAR = /^[A-Za-z0-9._-]$/;

/** Why a trust domain name is invalid, or undefined when it is valid. */
function trustDomainProblem(name: string): string | undefined {
  if (name === "") return "trust domain is missing";
  if (name.length > MAX_TRUST_DOMAIN_LENGTH) {
    return `trust domain is longer than ${MAX_TRUST_DOMAIN_LENGTH} characters`;
  }
  if (name.includes("@")) return "userinfo is not allowed in the trust domain";
  const colon = name.indexOf(":");
  if (colon >= 0) return "a port is not allowed in the trust domain";
  for (let i = 0; i < name.length; i++) {
    const c = name[i];
    if (TD_CHAR.test(c)) continue;
    if (c >= "A" && c <= "Z") {
      return `trust domain must be lowercase (found '${c}' at position ${i + 1})`;
    }
    if (c === "%") return "percent-encoding is not allowed in the trust domain";
    return `trust domain characters are limited to lowercase letters, digits, '.', '-' and '_' (found ${
      JSON.stringify(c)
    } at position ${i + 1})`;
  }
  return undefined;
}

/** Why a path is invalid, or undefined when it is valid. `path` is empty or starts with `/`. */
function pathProblem(path: string): string | undefined {
  if (path === "") return undefined;
  if (path === "/") return "path cannot be '/' alone (a trust domain ID has no path)";
  if (path.endsWith("/")) return "path cannot have a trailing slash";
  const segments = path.slice(1).split("/");
  for (const seg of segments) {
    if (seg === "") return "path cannot contain empty segments ('//')";
    if (seg === "." || seg === "..") return `path cannot contain '${seg}' segments`;
    for (let i = 0; i < seg.length; i++) {
      const c = seg[i];
      if (PATH_CHAR.test(c)) continue;
      if (c === "%") return "percent-encoding is not allowed in the path";
      return `path characters are limited to letters, digits, '.', '-' and '_' (found ${
        JSON.stringify(c)
      } in segment ${JSON.stringify(seg)})`;
    }
  }
  return undefined;
}

/** A SPIFFE trust domain, such as `example.org`. */
export class TrustDomain {
  /** Use `parseTrustDomain`; the constructor trusts its input. */
  private constructor(readonly name: string) {}

  /** @internal Builds a TrustDomain from an already validated name. */
  static unchecked(name: string): TrustDomain {
    return new TrustDomain(name);
  }

  /** The trust domain's own SPIFFE ID, `spiffe://example.org`. */
  id(): SpiffeId {
    return SpiffeId.unchecked(this, "");
  }

  /** `spiffe://example.org`, the form used as key of bundle maps in the Workload API. */
  idString(): string {
    return SPIFFE_SCHEME + this.name;
  }

  /** The bare name, `example.org`. */
  toString(): string {
    return this.name;
  }

  toJSON(): string {
    return this.name;
  }

  equals(other: TrustDomain | string): boolean {
    return typeof other === "string" ? this.name === other : this.name === other.name;
  }
}

/** A parsed, valid SPIFFE ID such as `spiffe://example.org/robot/robot-001`. */
export class SpiffeId {
  private constructor(readonly trustDomain: TrustDomain, readonly path: string) {}

  /** @internal Builds a SpiffeId from already validated parts. */
  static unchecked(td: TrustDomain, path: string): SpiffeId {
    return new SpiffeId(td, path);
  }

  /** Builds a SPIFFE ID from a trust domain and path segments, validating each part. */
  static fromSegments(td: TrustDomain | string, ...segments: string[]): SpiffeId {
    const trust = typeof td === "string" ? parseTrustDomain(td) : td;
    const path = segments.map((s) => "/" + s).join("");
    const slashed = segments.find((s) => s.includes("/"));
    if (slashed !== undefined) {
      throw new SpiffeIdError(
        trust.idString() + path,
        `segment ${JSON.stringify(slashed)} contains '/'`,
      );
    }
    const problem = pathProblem(path);
    if (problem) throw new SpiffeIdError(trust.idString() + path, problem);
    return new SpiffeId(trust, path);
  }

  toString(): string {
    return SPIFFE_SCHEME + this.trustDomain.name + this.path;
  }

  toJSON(): string {
    return this.toString();
  }

  equals(other: SpiffeId | string): boolean {
    return this.toString() === other.toString();
  }

  /** True when this ID belongs to the trust domain (given as a TrustDomain, name or ID). */
  memberOf(td: TrustDomain | string): boolean {
    if (typeof td !== "string") return this.trustDomain.name === td.name;
    const name = td.startsWith(SPIFFE_SCHEME) ? td.slice(SPIFFE_SCHEME.length) : td;
    return this.trustDomain.name === name;
  }

  /** True for the trust domain's own ID (no path). */
  isTrustDomainId(): boolean {
    return this.path === "";
  }
}

/**
 * Parses and validates a SPIFFE ID. Throws `SpiffeIdError` naming the broken rule.
 */
export function parseSpiffeId(s: string): SpiffeId {
  if (typeof s !== "string") throw new SpiffeIdError(String(s), "expected a string");
  if (s === "") throw new SpiffeIdError(s, "ID is empty");
  if (new TextEncoder().encode(s).length > MAX_SPIFFE_ID_LENGTH) {
    throw new SpiffeIdError(s, `ID is longer than ${MAX_SPIFFE_ID_LENGTH} bytes`);
  }
  if (!s.startsWith(SPIFFE_SCHEME)) {
    if (s.toLowerCase().startsWith(SPIFFE_SCHEME)) {
      throw new SpiffeIdError(s, "scheme must be lowercase 'spiffe://'");
    }
    const m = /^([A-Za-z][A-Za-z0-9+.-]*):/.exec(s);
    if (m) throw new SpiffeIdError(s, `scheme must be 'spiffe://', got '${m[1]}:'`);
    throw new SpiffeIdError(s, "scheme is missing (expected 'spiffe://')");
  }
  const rest = s.slice(SPIFFE_SCHEME.length);
  if (rest.includes("#")) throw new SpiffeIdError(s, "a fragment ('#') is not allowed");
  if (rest.includes("?")) throw new SpiffeIdError(s, "a query ('?') is not allowed");
  const slash = rest.indexOf("/");
  const tdName = slash < 0 ? rest : rest.slice(0, slash);
  const path = slash < 0 ? "" : rest.slice(slash);
  const tdProblem = trustDomainProblem(tdName);
  if (tdProblem) throw new SpiffeIdError(s, tdProblem);
  const pProblem = pathProblem(path);
  if (pProblem) throw new SpiffeIdError(s, pProblem);
  return SpiffeId.unchecked(TrustDomain.unchecked(tdName), path);
}

/** Like parseSpiffeId, but returns undefined instead of throwing. */
export function tryParseSpiffeId(s: string): SpiffeId | undefined {
  try {
    return parseSpiffeId(s);
  } catch {
    return undefined;
  }
}

/**
 * Parses a trust domain given as a bare name (`example.org`) or as its ID
 * (`spiffe://example.org`). An ID with a path is refused: pass `parseSpiffeId(s).trustDomain`
 * if that is what you mean.
 */
export function parseTrustDomain(s: string): TrustDomain {
  if (typeof s !== "string") throw new TrustDomainError(String(s), "expected a string");
  if (s.includes("://")) {
    let id: SpiffeId;
    try {
      id = parseSpiffeId(s);
    } catch (err) {
      if (err instanceof SpiffeIdError) throw new TrustDomainError(s, err.reason);
      throw err;
    }
    if (id.path !== "") {
      throw new TrustDomainError(s, `a trust domain has no path (got '${id.path}')`);
    }
    return id.trustDomain;
  }
  const problem = trustDomainProblem(s);
  if (problem) throw new TrustDomainError(s, problem);
  return TrustDomain.unchecked(s);
}
