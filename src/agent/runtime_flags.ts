/**
 * Runtime flags for a process that runs `k8s4r agent`: the one place they are decided. devenv's
 * agent row, the systemd unit (`k8s4r agent service`), the benchmarks and the tests that start
 * the agent CLI (tests/helpers/cli.ts, on robot hosts too) take them from here.
 *
 * The agent does little JavaScript work (a heartbeat every few seconds, a reconnect per SVID
 * rotation), so it trades V8's speed for memory (figures in docs/BENCHMARKS.md, agent memory):
 * - `--max-semi-space-size=1` caps the young generation at 1 MB per semi-space (V8 lets it grow
 *   to 16 MB on its own), which saved ~16 MB of RSS on this machine;
 * - `--lite-mode` turns off the optimizing compilers and their code caches, another ~7 MB.
 * The server keeps V8's defaults, because it parses thousands of messages per second.
 *
 * The V8 flags reach the child through `DENO_V8_FLAGS` (comma-separated), which both `deno run`
 * and a compiled k8s4r read. Flags already in the environment come last, so a user's choice
 * wins.
 */
export const AGENT_V8_FLAGS = ["--max-semi-space-size=1", "--lite-mode"] as const;

export function agentV8FlagsEnv(existing: string | undefined): string {
  return [...AGENT_V8_FLAGS, ...(existing ? [existing] : [])].join(",");
}

/**
 * `deno run` flags for an agent that runs from source (devenv, `agent service` from a checkout):
 * - `--no-code-cache`: Deno otherwise loads V8's code cache of every module (its SQLite cache in
 *   DENO_DIR) into the process, and keeps it: ~2.5 MB of private memory, for ~25 ms more to
 *   compile the agent's modules at start.
 * - `--node-modules-dir=manual`: use the project's node_modules as it is (`deno install
 *   --frozen` made it; devenv's other components and CI run that). With deno.json's `auto`,
 *   every start re-checks it against the npm registry metadata in DENO_DIR (it reads and keeps
 *   the metadata of mqtt and yaml, all their versions): ~1 MB of RSS, 0.6 MB private. A missing
 *   package is then Deno's error naming it and `deno install`, instead of a download.
 * A compiled k8s4r (production) takes no `deno run` flags: it embeds its modules and has no
 * node_modules or DENO_DIR to check, and its own code cache (Deno writes one on the first run)
 * covers only the modules imported statically at start, not the lazily imported subcommands.
 */
export const AGENT_DENO_RUN_FLAGS = ["--no-code-cache", "--node-modules-dir=manual"] as const;

/**
 * The arguments that start the agent, given how k8s4r starts itself: `["run", ...rest]` (deno
 * running main.ts) gets the agent's `deno run` flags after `run`; anything else (a compiled
 * k8s4r: no arguments) is returned as it is.
 */
export function agentRunArgs(selfArgs: readonly string[]): string[] {
  if (selfArgs[0] !== "run") return [...selfArgs];
  return ["run", ...AGENT_DENO_RUN_FLAGS, ...selfArgs.slice(1)];
}
