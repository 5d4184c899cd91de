/**
 * The real k8s4r CLI (`deno run -A main.ts ...`) as a child of the test, with its output
 * collected as it comes. `prefix` runs it through another command first (`ip netns exec NS`).
 * The environment is the test's, less anything that could point the child at a developer's
 * stack or hand it a secret (SPIRE_JOIN_TOKEN, ROBOT_ID, MQTT_BROKER_URL). `k8s4r agent ...`
 * runs with the agent's runtime flags (src/agent/runtime_flags.ts), as devenv and the unit of
 * `agent service` run it.
 */
import { fileURLToPath } from "node:url";
import { agentRunArgs, agentV8FlagsEnv } from "../../src/agent/runtime_flags.ts";
import { childrenOf } from "../e2e/stack.ts";

export const MAIN = fileURLToPath(new URL("../../main.ts", import.meta.url));
export const CONFIG = fileURLToPath(new URL("../../deno.json", import.meta.url));

export interface CliProcess {
  pid: number;
  exited: Promise<number>;
  stdout(): string;
  stderr(): string;
  /** The child's own children (spire-agent, tasks). */
  children(): number[];
  /** SIGTERM, then the exit code (SIGKILL after `graceMs`). */
  stop(graceMs?: number): Promise<number>;
}

export function cliEnv(extra: Record<string, string> = {}): Record<string, string> {
  const env: Record<string, string> = { ...Deno.env.toObject(), NO_COLOR: "1", ...extra };
  for (const k of ["SPIRE_JOIN_TOKEN", "ROBOT_ID", "MQTT_BROKER_URL"]) delete env[k];
  return env;
}

export function startCli(
  args: string[],
  opts: { env?: Record<string, string>; cwd?: string; prefix?: string[] } = {},
): CliProcess {
  const agent = args[0] === "agent";
  const run = ["run", "-A", "--config", CONFIG, MAIN];
  const argv = [
    ...(opts.prefix ?? []),
    Deno.execPath(),
    ...(agent ? agentRunArgs(run) : run),
    ...args,
  ];
  const env = opts.env ?? cliEnv();
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    env: agent ? { ...env, DENO_V8_FLAGS: agentV8FlagsEnv(env.DENO_V8_FLAGS) } : env,
    clearEnv: true,
    cwd: opts.cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const td = new TextDecoder();
  let out = "";
  let err = "";
  const pump = async (s: ReadableStream<Uint8Array>, add: (t: string) => void) => {
    for await (const chunk of s) add(td.decode(chunk, { stream: true }));
  };
  const pumps = Promise.all([
    pump(child.stdout, (t) => (out += t)),
    pump(child.stderr, (t) => (err += t)),
  ]);
  const exited = child.status.then(async (s) => {
    await pumps;
    return s.code;
  });
  return {
    pid: child.pid,
    exited,
    stdout: () => out,
    stderr: () => err,
    children: () => childrenOf(child.pid),
    async stop(graceMs = 15_000) {
      try {
        child.kill("SIGTERM");
      } catch { /* already gone */ }
      const timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch { /* gone */ }
      }, graceMs);
      try {
        return await exited;
      } finally {
        clearTimeout(timer);
      }
    },
  };
}
