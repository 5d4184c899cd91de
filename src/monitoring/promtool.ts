/**
 * `promtool` (Debian's `prometheus` package) as a library: lint a metrics page, check and unit
 * test rule files, check a Prometheus config. Runs through the one process helper.
 *
 * Exit codes of `promtool check metrics` (Prometheus 2.42): 0 clean, 3 lint problems (the page
 * parses but breaks naming conventions), 1 the page does not parse.
 */
import { CliError } from "../cli/errors.ts";
import type { ProcessRunner } from "../process/mod.ts";

/** `$K8S4R_PROMTOOL`, else `promtool` on PATH. */
export function promtoolBin(env: Record<string, string | undefined> = {}): string {
  return env.K8S4R_PROMTOOL || "promtool";
}

export interface PromtoolResult {
  /** Exit 0. */
  ok: boolean;
  code: number;
  /** Non-empty output lines (promtool writes problems to stderr). */
  problems: string[];
  output: string;
}

async function run(
  runner: ProcessRunner,
  bin: string,
  args: string[],
  stdin?: string,
): Promise<PromtoolResult> {
  let r;
  try {
    r = await runner.output(bin, args, { check: false, stdin, timeoutMs: 60_000 });
  } catch (err) {
    if (err instanceof CliError && /command not found/.test(err.message)) {
      throw new CliError(
        `${bin}: not found; install Debian's prometheus package (apt-get install prometheus) or set K8S4R_PROMTOOL`,
      );
    }
    throw err;
  }
  const output = `${r.stdout}${r.stderr}`;
  return {
    ok: r.code === 0,
    code: r.code,
    problems: output.split("\n").map((l) => l.trim()).filter((l) => l !== ""),
    output,
  };
}

/** Lints a page in the Prometheus text format (`promtool check metrics`, on stdin). */
export function checkMetrics(runner: ProcessRunner, text: string, bin = "promtool") {
  return run(runner, bin, ["check", "metrics"], text);
}

/** Fetches `url` (a running endpoint) and lints what it serves. Throws on a non-200 answer. */
export async function checkMetricsEndpoint(
  runner: ProcessRunner,
  url: string,
  bin = "promtool",
): Promise<PromtoolResult & { contentType: string | null }> {
  const res = await fetch(url);
  const text = await res.text();
  if (res.status !== 200) throw new Error(`${url}: HTTP ${res.status}: ${text.slice(0, 200)}`);
  return {
    ...(await checkMetrics(runner, text, bin)),
    contentType: res.headers.get("content-type"),
  };
}

/** `promtool check rules FILE...` */
export function checkRules(runner: ProcessRunner, files: string[], bin = "promtool") {
  return run(runner, bin, ["check", "rules", ...files]);
}

/** `promtool test rules FILE...` (rule unit tests). */
export function testRules(runner: ProcessRunner, files: string[], bin = "promtool") {
  return run(runner, bin, ["test", "rules", ...files]);
}

/** `promtool check config FILE` (also checks the rule files it names). */
export function checkConfig(runner: ProcessRunner, file: string, bin = "promtool") {
  return run(runner, bin, ["check", "config", file]);
}
