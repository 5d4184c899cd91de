/**
 * Test helpers for metrics pages: the same promtool lint for a rendered page (unit tests) and
 * for a running endpoint (integration and e2e tests against a real stack).
 */
import { realRunner } from "../process/mod.ts";
import {
  checkMetrics,
  checkMetricsEndpoint,
  promtoolBin,
  type PromtoolResult,
} from "./promtool.ts";

function verdict(what: string, r: PromtoolResult): void {
  if (!r.ok) {
    throw new Error(
      `promtool check metrics failed on ${what} (exit ${r.code}):\n${r.problems.join("\n")}`,
    );
  }
}

/** Throws unless `promtool check metrics` accepts `text` without a single problem. */
export async function assertPromtoolClean(text: string, what = "the metrics page"): Promise<void> {
  verdict(what, await checkMetrics(realRunner, text, promtoolBin(Deno.env.toObject())));
}

/**
 * Throws unless `url` answers 200 with the Prometheus text format and promtool accepts it
 * without a problem. Phase 2 points this at the fleet server's and the agents' endpoints.
 */
export async function assertEndpointPromtoolClean(url: string): Promise<void> {
  const r = await checkMetricsEndpoint(realRunner, url, promtoolBin(Deno.env.toObject()));
  if (!r.contentType?.startsWith("text/plain")) {
    throw new Error(`${url}: content-type ${r.contentType}, expected text/plain; version=0.0.4`);
  }
  verdict(url, r);
}

/**
 * For third-party endpoints (SPIRE's telemetry), whose names we do not choose: the page must
 * parse (promtool exit 0 or 3); lint problems are returned for the caller to report.
 */
export async function assertEndpointParses(url: string): Promise<string[]> {
  const r = await checkMetricsEndpoint(realRunner, url, promtoolBin(Deno.env.toObject()));
  if (r.code !== 0 && r.code !== 3) {
    throw new Error(`${url}: promtool cannot parse the page (exit ${r.code}): ${r.output}`);
  }
  return r.problems;
}
