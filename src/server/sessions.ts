/**
 * The dashboard's browser sessions. A browser has no client certificate, so an operator gets
 * one through the CLI, which does have one:
 *
 * 1. `k8s4r dashboard` asks `POST /api/dashboard/login` over its mTLS credentials; the server
 *    issues a **one-time login token** for that operator (random 256 bits, valid for
 *    `loginTtlMs`, 2 minutes by default) and the CLI prints `https://.../dashboard/login?token=T`.
 * 2. The browser opens it: that page only asks to confirm (it names the operator), so a link
 *    preview or a prefetch that fetches the URL does not use the token up nor get a session.
 *    Its button POSTs the token back (same origin): the token is redeemed (once: a second use,
 *    or a use after expiry, is refused), and the answer sets a **session cookie**
 *    (`__Host-k8s4r_session`: `HttpOnly; Secure; SameSite=Strict; Path=/`, no Domain, so no
 *    other origin, not even plain-HTTP localhost, can plant or shadow one) with a new random
 *    session id, then redirects to the dashboard without the token in the address.
 * 3. Requests carrying the cookie act as that operator: the identity comes from the session, the
 *    role from the roles config at each request (so `operator remove` or a role change applies
 *    to browsers at once), exactly as for a client certificate.
 *
 * Only SHA-256 hashes of tokens and session ids are kept (a memory dump or a log of this map
 * gives nothing usable), lookups are by hash (no timing leak of a string compare). Sessions
 * live in memory: a server restart logs every browser out. A session ends after `sessionTtlMs`
 * (8 h), or when the operator certificate it was issued through expires, whichever is first.
 * Both maps are bounded, per operator first (one operator's logins only ever push out its own
 * oldest ones), then overall; the oldest entries go first.
 */
import { createHash } from "node:crypto";

export const SESSION_COOKIE = "__Host-k8s4r_session";
export const DEFAULT_LOGIN_TTL_MS = 2 * 60_000;
export const DEFAULT_SESSION_TTL_MS = 8 * 3600_000;

export interface SessionIdentity {
  spiffeId: string;
  operator: string;
  /**
   * The notBefore (ms) of the certificate the login was asked with: once the operator's
   * certificate is re-issued (roles.yaml `issuedAfter`), its sessions are refused too.
   */
  issuedAt?: number;
}

export interface Session extends SessionIdentity {
  createdAt: number;
  expiresAt: number;
}

interface PendingLogin extends SessionIdentity {
  /** Not a secret: lets the CLI that asked for the login see whether it was used. */
  id: string;
  expiresAt: number;
  /** Until when the session may last (the certificate the login was asked with). */
  until: number;
  used: boolean;
}

export type LoginState = "pending" | "used" | "expired" | "unknown";

export type PeekResult =
  | { ok: true; operator: string; spiffeId: string }
  | { ok: false; reason: "unknown" | "used" | "expired" };

export type RedeemResult =
  | { ok: true; sessionId: string; session: Session }
  | { ok: false; reason: "unknown" | "used" | "expired" };

export interface SessionsOptions {
  now?: () => number;
  loginTtlMs?: number;
  sessionTtlMs?: number;
  maxSessions?: number;
  maxPendingLogins?: number;
  /** Sessions one operator may hold; its oldest goes first. Default 16. */
  maxSessionsPerOperator?: number;
  /** Logins one operator may hold (used ones are kept until they expire, to say so); its used,
   * then its oldest go first. Default 8. */
  maxPendingLoginsPerOperator?: number;
}

function hash(s: string): string {
  return createHash("sha256").update(s).digest("hex");
}

function randomToken(): string {
  const b = crypto.getRandomValues(new Uint8Array(32));
  return btoa(String.fromCharCode(...b)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** Tokens and session ids are 43 base64url characters. */
const TOKEN_RE = /^[A-Za-z0-9_-]{43}$/;

export class DashboardSessions {
  readonly #now: () => number;
  readonly loginTtlMs: number;
  readonly sessionTtlMs: number;
  readonly #maxSessions: number;
  readonly #maxPending: number;
  readonly #maxSessionsPer: number;
  readonly #maxPendingPer: number;
  readonly #logins = new Map<string, PendingLogin>();
  readonly #sessions = new Map<string, Session>();

  constructor(opts: SessionsOptions = {}) {
    this.#now = opts.now ?? Date.now;
    this.loginTtlMs = opts.loginTtlMs ?? DEFAULT_LOGIN_TTL_MS;
    this.sessionTtlMs = opts.sessionTtlMs ?? DEFAULT_SESSION_TTL_MS;
    this.#maxSessions = opts.maxSessions ?? 1000;
    this.#maxPending = opts.maxPendingLogins ?? 100;
    this.#maxSessionsPer = opts.maxSessionsPerOperator ?? 16;
    this.#maxPendingPer = opts.maxPendingLoginsPerOperator ?? 8;
  }

  /**
   * A one-time login token for `who`, valid for `loginTtlMs`; the session it opens ends at the
   * latest at `until` (the caller's certificate's notAfter).
   */
  issueLogin(
    who: SessionIdentity,
    until = Infinity,
  ): { token: string; id: string; expiresAt: number } {
    this.#prune();
    const token = randomToken();
    const id = randomToken();
    const expiresAt = this.#now() + this.loginTtlMs;
    this.#logins.set(hash(token), {
      id,
      spiffeId: who.spiffeId,
      operator: who.operator,
      ...(who.issuedAt !== undefined ? { issuedAt: who.issuedAt } : {}),
      expiresAt,
      until,
      used: false,
    });
    evict(this.#logins, this.#maxPending, this.#maxPendingPer, who.spiffeId, (p) => p.used);
    return { token, id, expiresAt };
  }

  /** Whether a login token would be accepted now, and for whom, without using it. */
  peek(token: string): PeekResult {
    if (!TOKEN_RE.test(token)) return { ok: false, reason: "unknown" };
    const p = this.#logins.get(hash(token));
    if (!p) return { ok: false, reason: "unknown" };
    if (p.used) return { ok: false, reason: "used" };
    if (this.#now() > p.expiresAt) return { ok: false, reason: "expired" };
    return { ok: true, operator: p.operator, spiffeId: p.spiffeId };
  }

  /** The state of the login `id`, for the identity that asked for it (anyone else: unknown). */
  loginState(id: string, spiffeId: string): LoginState {
    for (const p of this.#logins.values()) {
      if (p.id !== id || p.spiffeId !== spiffeId) continue;
      if (p.used) return "used";
      return this.#now() > p.expiresAt ? "expired" : "pending";
    }
    return "unknown";
  }

  /**
   * Redeems a login token (once) into a new session. Synchronous from the check to the mark,
   * so two requests racing with one token give one session.
   */
  redeem(token: string): RedeemResult {
    if (!TOKEN_RE.test(token)) return { ok: false, reason: "unknown" };
    const key = hash(token);
    const p = this.#logins.get(key);
    if (!p) return { ok: false, reason: "unknown" };
    const now = this.#now();
    if (p.used) return { ok: false, reason: "used" };
    if (now > p.expiresAt) return { ok: false, reason: "expired" };
    // Kept (as used) until it would have expired, so a second use says so.
    p.used = true;
    const sessionId = randomToken();
    const session: Session = {
      spiffeId: p.spiffeId,
      operator: p.operator,
      ...(p.issuedAt !== undefined ? { issuedAt: p.issuedAt } : {}),
      createdAt: now,
      expiresAt: Math.min(now + this.sessionTtlMs, p.until),
    };
    this.#sessions.set(hash(sessionId), session);
    evict(this.#sessions, this.#maxSessions, this.#maxSessionsPer, session.spiffeId);
    return { ok: true, sessionId, session };
  }

  /** The live session of a cookie value, if any. */
  lookup(sessionId: string | undefined): Session | undefined {
    if (!sessionId || !TOKEN_RE.test(sessionId)) return undefined;
    const key = hash(sessionId);
    const s = this.#sessions.get(key);
    if (!s) return undefined;
    if (this.#now() > s.expiresAt) {
      this.#sessions.delete(key);
      return undefined;
    }
    return s;
  }

  /** Ends a session (logout). */
  revoke(sessionId: string | undefined): boolean {
    if (!sessionId || !TOKEN_RE.test(sessionId)) return false;
    return this.#sessions.delete(hash(sessionId));
  }

  get size(): { sessions: number; pendingLogins: number } {
    return { sessions: this.#sessions.size, pendingLogins: this.#logins.size };
  }

  #prune(): void {
    const now = this.#now();
    for (const [k, p] of this.#logins) if (now > p.expiresAt) this.#logins.delete(k);
    for (const [k, s] of this.#sessions) if (now > s.expiresAt) this.#sessions.delete(k);
  }
}

/**
 * Bounds a map (insertion order: oldest first): `who` keeps at most `perWho` entries, then the
 * whole map at most `max`; entries `spent` says are of no more use go before the others.
 */
function evict<T extends { spiffeId: string }>(
  map: Map<string, T>,
  max: number,
  perWho: number,
  who: string,
  spent: (v: T) => boolean = () => false,
): void {
  let mine = 0;
  for (const v of map.values()) if (v.spiffeId === who) mine++;
  for (const pass of [spent, () => true]) {
    for (const [k, v] of map) {
      if (mine <= perWho) break;
      if (v.spiffeId === who && pass(v)) {
        map.delete(k);
        mine--;
      }
    }
  }
  for (const pass of [spent, () => true]) {
    for (const [k, v] of map) {
      if (map.size <= max) break;
      if (pass(v)) map.delete(k);
    }
  }
}

/** The session cookie of a request, if it carries one. */
export function sessionCookie(req: Request): string | undefined {
  const header = req.headers.get("cookie");
  if (!header) return undefined;
  for (const part of header.split(";")) {
    const i = part.indexOf("=");
    if (i < 0) continue;
    if (part.slice(0, i).trim() === SESSION_COOKIE) return part.slice(i + 1).trim();
  }
  return undefined;
}

/**
 * `Set-Cookie` for a new session: HttpOnly, Secure, SameSite=Strict, for the whole server. The
 * `__Host-` prefix makes browsers refuse the name unless it is Secure, Path=/ and has no
 * Domain: a plain-HTTP page on the same host (another port) cannot set or shadow it.
 */
export function setSessionCookie(sessionId: string, maxAgeSeconds: number): string {
  return `${SESSION_COOKIE}=${sessionId}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=${
    Math.max(0, Math.floor(maxAgeSeconds))
  }`;
}

/** `Set-Cookie` that removes the session cookie. */
export function clearSessionCookie(): string {
  return `${SESSION_COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0`;
}
