/**
 * k8s4r entry point. It parses the command line, runs one command, and is the only place
 * that exits the process.
 */
import { loadCommandPath, renderHelp, runCli } from "./src/cli/mod.ts";
import { rootCommand } from "./src/cli/commands.ts";
import { CliError, errorMessage } from "./src/cli/errors.ts";
import { realIo } from "./src/cli/io.ts";

async function main(argv: string[]): Promise<number> {
  const ac = new AbortController();
  const onSignal = () => ac.abort(new Error("interrupted"));
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  const io = realIo(ac.signal);
  try {
    const code = await runCli(rootCommand, argv, io);
    if (code === -1) {
      io.stdout.write(renderHelp(await loadCommandPath(rootCommand, []), ["k8s4r"]));
      return 0;
    }
    return code;
  } catch (err) {
    if (err instanceof CliError) {
      io.stderr.write(`k8s4r: ${err.message}\n`);
      if (err.hint) io.stderr.write(`hint: ${err.hint}\n`);
      return err.exitCode;
    }
    if (ac.signal.aborted) return 130;
    io.stderr.write(`k8s4r: internal error: ${errorMessage(err)}\n`);
    if (Deno.env.get("K8S4R_DEBUG")) console.error(err);
    return 70;
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
