/**
 * The dashboard's own routes, served by the fleet server under `/dashboard/`:
 *
 *   GET  /dashboard/                   the single page (src/dashboard/assets/index.html)
 *   GET  /dashboard/assets/NAME        its script and style sheet
 *   GET  /dashboard/login?token=T      redeems a one-time login (sessions.ts): sets the session
 *                                      cookie and redirects to /dashboard/ (303); a used,
 *                                      expired or unknown token is a 401 page saying which
 *   POST /dashboard/logout             ends the session, clears the cookie (needs an Origin)
 *
 * The assets are embedded in the program (src/dashboard/embedded_assets.ts, generated from
 * src/dashboard/assets/ by scripts/embed_dashboard.ts), so a compiled binary serves them and
 * nothing is built at run time. They hold no data: the page reads the API with its cookie, and
 * every answer there is authorized as for a certificate. Every response here carries a strict
 * Content-Security-Policy (scripts and styles from this origin only, no inline code, no
 * framing) and `Referrer-Policy: no-referrer`, so the login URL never leaks through a Referer.
 */
import { DASHBOARD_ASSETS } from "../dashboard/embedded_assets.ts";
import type { Logger } from "./fleet.ts";
import {
  clearSessionCookie,
  type DashboardSessions,
  sessionCookie,
  setSessionCookie,
} from "./sessions.ts";

export const DASHBOARD_CSP = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' data:",
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'self'",
  "frame-ancestors 'none'",
].join("; ");

const SECURITY_HEADERS: Record<string, string> = {
  "content-security-policy": DASHBOARD_CSP,
  "referrer-policy": "no-referrer",
  "x-content-type-options": "nosniff",
  "x-frame-options": "DENY",
  "cross-origin-opener-policy": "same-origin",
};

const TYPES: Record<string, string> = {
  html: "text/html; charset=utf-8",
  js: "text/javascript; charset=utf-8",
  css: "text/css; charset=utf-8",
  svg: "image/svg+xml",
};

function asset(name: string): Response | undefined {
  const body = DASHBOARD_ASSETS[name];
  if (body === undefined) return undefined;
  const ext = name.slice(name.lastIndexOf(".") + 1);
  return new Response(body, {
    status: 200,
    headers: {
      ...SECURITY_HEADERS,
      "content-type": TYPES[ext] ?? "application/octet-stream",
      // The assets change with the program: revalidate, never serve a stale script.
      "cache-control": "no-cache",
    },
  });
}

function page(status: number, title: string, text: string, headers: HeadersInit = {}): Response {
  const esc = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  return new Response(
    `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title>` +
      `<link rel="stylesheet" href="/dashboard/assets/style.css"></head><body class="notice">` +
      `<main><h1>${esc(title)}</h1><p>${esc(text)}</p></main></body></html>\n`,
    {
      status,
      headers: {
        ...SECURITY_HEADERS,
        "content-type": "text/html; charset=utf-8",
        "cache-control": "no-store",
        ...headers,
      },
    },
  );
}

const WHY: Record<"unknown" | "used" | "expired", string> = {
  used: "This login link was used already: each one works once.",
  expired: "This login link has expired: each one is valid for a few minutes.",
  unknown: "This login link is not valid (or the fleet server restarted since it was made).",
};

/** Handles `/dashboard/...` (Host and Origin were checked by the API's handler). */
export function dashboardRoute(
  req: Request,
  url: URL,
  opts: { sessions?: DashboardSessions; logger: Logger },
): Response | Promise<Response> {
  const path = url.pathname;
  if (path === "/dashboard") {
    return new Response(null, { status: 308, headers: { location: "/dashboard/" } });
  }
  if (path === "/dashboard/login") {
    if (req.method !== "GET") {
      return page(405, "Method not allowed", "Open the login link in a browser.", {
        allow: "GET",
      });
    }
    const sessions = opts.sessions;
    if (!sessions) return page(404, "No dashboard logins", "This server has no dashboard.");
    const r = sessions.redeem(url.searchParams.get("token") ?? "");
    if (!r.ok) {
      opts.logger.warn(`dashboard login refused: ${r.reason} token`);
      return page(
        401,
        "Login link refused",
        `${
          WHY[r.reason]
        } Ask for a new one on a host with your operator credentials: k8s4r dashboard`,
      );
    }
    opts.logger.info(`dashboard session opened for ${r.session.spiffeId}`);
    return new Response(null, {
      status: 303,
      headers: {
        ...SECURITY_HEADERS,
        location: "/dashboard/",
        "cache-control": "no-store",
        "set-cookie": setSessionCookie(r.sessionId, (r.session.expiresAt - Date.now()) / 1000),
      },
    });
  }
  if (path === "/dashboard/logout") {
    if (req.method !== "POST") {
      return page(405, "Method not allowed", "Log out from the dashboard's button.", {
        allow: "POST",
      });
    }
    if (!req.headers.get("origin")) {
      return page(403, "Refused", "A logout must come from the dashboard's own page.");
    }
    opts.sessions?.revoke(sessionCookie(req));
    return new Response(null, {
      status: 204,
      headers: { ...SECURITY_HEADERS, "set-cookie": clearSessionCookie() },
    });
  }
  if (req.method !== "GET" && req.method !== "HEAD") {
    return page(405, "Method not allowed", `${req.method} ${path}`, { allow: "GET, HEAD" });
  }
  if (path === "/dashboard/" || path === "/dashboard/index.html") {
    return asset("index.html")!;
  }
  const m = /^\/dashboard\/assets\/([a-z0-9_-]+\.[a-z]+)$/.exec(path);
  const a = m ? asset(m[1]) : undefined;
  return a ?? page(404, "Not found", `No such page: ${path}`);
}
