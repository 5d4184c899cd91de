/**
 * Group `stack`: one check per component of the dev stack's component table (handed in by the
 * CLI composition as `StackComponentCheck`s): it runs (our pid file) and its own probe says
 * healthy. On the HA stack this covers PostgreSQL, both SPIRE servers and haproxy too.
 */
import { type Check, fail, ok, type StackComponentCheck } from "../check.ts";

/** The budget of one component's status (an agent's includes a Workload API fetch). */
export const STACK_CHECK_TIMEOUT_MS = 6000;

export function stackChecks(components: StackComponentCheck[]): Check[] {
  return components.map((c): Check => ({
    id: `stack.${c.name}`,
    group: "stack",
    title: `${c.name} runs and is healthy`,
    timeoutMs: STACK_CHECK_TIMEOUT_MS,
    timeout: {
      hint: () =>
        `${c.name} did not answer its probe within ${STACK_CHECK_TIMEOUT_MS / 1000} s: ` +
        "`k8s4r devenv status` shows every component",
    },
    async run() {
      const s = await c.status();
      if (s.running && s.healthy) {
        return ok(
          [s.pid !== null ? `pid ${s.pid}` : "", s.endpoint, s.detail].filter(Boolean)
            .join(", "),
        );
      }
      const what = s.running ? "unhealthy" : "not running";
      return fail(`${what}${s.detail ? `: ${s.detail}` : ""}`, c.hint());
    },
  }));
}
