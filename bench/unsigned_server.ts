/**
 * The benchmark's baseline only: `k8s4r server` exactly as the CLI runs it (same flags, same
 * code), except that tasks and cancels go out as plain JSON, as before the server signed them.
 * bench/fleet.ts runs it in place of the dev stack's server to measure the task round trip
 * without signing and verification, side by side with the real (signing) server in the same run.
 * Robots refuse what it sends; only the simulator's `unsignedBaseline` mode accepts it.
 *
 *   deno run -A bench/unsigned_server.ts <the flags of `k8s4r server`>
 */
import { resolve } from "../src/cli/mod.ts";
import { CliError } from "../src/cli/errors.ts";
import { realIo } from "../src/cli/io.ts";
import { runServer, serverCommand } from "../src/server/command.ts";
import { UNSIGNED } from "../src/server/testing.ts";

if (import.meta.main) {
  const ac = new AbortController();
  const stop = () => ac.abort();
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
  const io = realIo(ac.signal);
  let code: number;
  try {
    const r = resolve(serverCommand, Deno.args);
    io.stderr.write("bench: UNSIGNED baseline server (tasks and cancels without signature)\n");
    code = await runServer(r.args, io, () => UNSIGNED);
  } catch (err) {
    io.stderr.write(`unsigned_server: ${(err as Error).message}\n`);
    code = err instanceof CliError ? err.exitCode : 70;
  }
  Deno.exit(code);
}
