/**
 * Shared Prometheus exposition helpers for the fleet server's and the agent's `/metrics`.
 *
 * The text format is produced by npm `prom-client` (pinned in deno.json), the maintained
 * Prometheus client for JavaScript, not by hand: it validates metric and label names, escapes
 * label values and HELP text, formats `+Inf`/`NaN`, writes histogram buckets with their `le`
 * labels and cumulative counts, and keeps counters monotonic. A hand-written exposition would
 * have to get each of those right and keep them right. It runs under Deno 2.9 through `npm:`
 * (every renderer's output is checked by `promtool check metrics` in its tests).
 *
 * Values are collected lazily at scrape time (prom-client's `collect()` hooks), so nothing is
 * updated per message that a scrape can compute from the sources.
 */
import { Registry } from "prom-client";
import { isLoopbackHost, parseAuthority } from "../fleet/addresses.ts";

export { Counter, Gauge, Histogram, Registry } from "prom-client";

/** `text/plain; version=0.0.4; charset=utf-8`: the Prometheus text format. */
export const METRICS_CONTENT_TYPE: string = Registry.PROMETHEUS_CONTENT_TYPE;

/** The path both endpoints serve. */
export const METRICS_PATH = "/metrics";

/**
 * Seconds since the Unix epoch (Prometheus' unit for `_timestamp_seconds`), from an RFC 3339
 * string, a Date or epoch milliseconds; undefined for a missing or unparsable value.
 */
export function epochSeconds(v: string | Date | number | null | undefined): number | undefined {
  if (v === null || v === undefined) return undefined;
  const ms = typeof v === "number" ? v : typeof v === "string" ? Date.parse(v) : v.getTime();
  return Number.isFinite(ms) ? ms / 1000 : undefined;
}

/**
 * Runs async jobs one at a time. A scrape takes one snapshot of its sources and renders from
 * it; two overlapping scrapes must not interleave their snapshots.
 */
export class Serial {
  #tail: Promise<unknown> = Promise.resolve();

  run<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.#tail.then(fn, fn);
    this.#tail = p.catch(() => {});
    return p;
  }
}

/** What renders a metrics page. */
export interface MetricsRenderer {
  render(): Promise<string>;
}

/**
 * The `/metrics` response for a request: GET and HEAD get the text format, any other method
 * 405 with `Allow`. A failing render is a 500 with the error (Prometheus then marks the target
 * down, which is the truth).
 */
export async function metricsResponse(req: Request, m: MetricsRenderer): Promise<Response> {
  if (req.method !== "GET" && req.method !== "HEAD") {
    return new Response(`method ${req.method} not allowed (allowed: GET, HEAD)\n`, {
      status: 405,
      headers: { allow: "GET, HEAD", "content-type": "text/plain; charset=utf-8" },
    });
  }
  let body: string;
  try {
    body = await m.render();
  } catch (err) {
    return new Response(`metrics: ${(err as Error).message}\n`, {
      status: 500,
      headers: { "content-type": "text/plain; charset=utf-8" },
    });
  }
  return new Response(req.method === "HEAD" ? null : body, {
    status: 200,
    headers: { "content-type": METRICS_CONTENT_TYPE },
  });
}

export interface MetricsServer {
  addr: { hostname: string; port: number };
  /** `http://127.0.0.1:PORT/metrics` */
  url: string;
  close(): Promise<void>;
}

/**
 * A small HTTP server that serves only `GET /metrics` (the agent's loopback endpoint). It
 * refuses a non-loopback address: robot metrics are for a local collector, the fleet sees them
 * through the heartbeat.
 */
export function serveMetrics(
  m: MetricsRenderer,
  opts: { hostname: string; port: number },
): MetricsServer {
  if (!isLoopbackHost(opts.hostname)) {
    throw new Error(
      `metrics address: expected a loopback host (127.0.0.1, ::1, localhost), got ${
        JSON.stringify(opts.hostname)
      }`,
    );
  }
  const ac = new AbortController();
  const server = Deno.serve({
    hostname: opts.hostname,
    port: opts.port,
    signal: ac.signal,
    onListen: () => {},
  }, (req) => {
    // DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 reaches this
    // port from the robot's browser with `Host: evil.example:PORT`; only loopback names pass.
    const hostRefusal = checkLoopbackHostHeader(req.headers.get("host"), server.addr.port);
    if (hostRefusal) return new Response(`${hostRefusal}\n`, { status: 403 });
    const path = new URL(req.url).pathname;
    if (path !== METRICS_PATH) {
      return new Response(`no such endpoint ${path} (try ${METRICS_PATH})\n`, { status: 404 });
    }
    return metricsResponse(req, m);
  });
  const a = server.addr;
  const host = a.hostname.includes(":") ? `[${a.hostname}]` : a.hostname;
  return {
    addr: { hostname: a.hostname, port: a.port },
    url: `http://${host}:${a.port}${METRICS_PATH}`,
    async close() {
      ac.abort();
      await server.finished;
    },
  };
}

/**
 * Why a Host header does not name this loopback listener (undefined when it does): a loopback
 * name (`localhost`, 127.0.0.0/8, `[::1]`) with no port or the listener's.
 */
export function checkLoopbackHostHeader(host: string | null, port: number): string | undefined {
  if (!host) return "Host header missing";
  const a = parseAuthority(host.trim(), port);
  if (!a || !isLoopbackHost(a.name) || a.port !== port) {
    return `Host ${
      JSON.stringify(host)
    } is not this loopback listener (expected 127.0.0.1:${port}, localhost:${port} or [::1]:${port})`;
  }
  return undefined;
}
