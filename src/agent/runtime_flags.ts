/**
 * V8 flags for a process that runs `k8s4r agent`.
 *
 * The agent does little JavaScript work (a heartbeat every few seconds, a reconnect per SVID
 * rotation), so it trades V8's speed for memory:
 * - `--max-semi-space-size=1` caps the young generation at 1 MB per semi-space (V8 lets it grow
 *   to 16 MB on its own), which saved ~16 MB of RSS on this machine;
 * - `--lite-mode` turns off the optimizing compilers and their code caches, another ~7 MB.
 * Both are measured in docs/BENCHMARKS.md (agent footprint). The server keeps V8's defaults,
 * because it parses thousands of messages per second.
 *
 * They reach the child through `DENO_V8_FLAGS` (comma-separated), which both `deno run` and a
 * compiled k8s4r read. Flags already in the environment come last, so a user's choice wins.
 */
export const AGENT_V8_FLAGS = ["--max-semi-space-size=1", "--lite-mode"] as const;

export function agentV8FlagsEnv(existing: string | undefined): string {
  return [...AGENT_V8_FLAGS, ...(existing ? [existing] : [])].join(",");
}
