/**
 * `k8s4r devenv install`: provisions SPIRE (pinned version) into the k8s4r cache, and checks
 * that mosquitto 2.x and openssl are installed. Prints what it found or built, and where.
 */
import type { Args } from "../cli/mod.ts";
import { CliError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { SPIRE_VERSION } from "../version.ts";
import { displayPath, type EnsureOptions, ensureSpireBinaries, findMosquitto } from "./binaries.ts";

const SOURCE_TEXT = {
  env: "from K8S4R_SPIRE_BIN_DIR",
  cache: "already in the k8s4r cache",
  path: "found on PATH",
  built: "built from the Go module proxy",
  downloaded: "downloaded from the official release",
} as const;

/** `openssl version` -> `3.0.19`, or a CliError with an install hint. */
export async function findOpenssl(io: Io): Promise<{ version: string }> {
  try {
    const r = await io.runner.output("openssl", ["version"], { timeoutMs: 10_000 });
    const m = r.stdout.match(/^(?:OpenSSL|LibreSSL)\s+(\S+)/);
    if (m) return { version: m[1] };
  } catch { /* reported below */ }
  throw new CliError(
    "openssl not found on PATH",
    1,
    "install it: `apt-get install -y openssl` (Debian/Ubuntu) or `brew install openssl` (macOS)",
  );
}

export async function installCommand(
  _args: Args | undefined,
  io: Io,
  opts: EnsureOptions = {},
): Promise<number> {
  const out = (line: string) => io.stdout.write(line + "\n");
  out(`Provisioning SPIRE ${SPIRE_VERSION}`);
  const spire = await ensureSpireBinaries(io, (line) => out(`  ${line}`), opts);
  out(`  spire-server ${spire.version}  ${displayPath(spire.server, io.env)}`);
  out(`  spire-agent  ${spire.version}  ${displayPath(spire.agent, io.env)}`);
  out(`  (${SOURCE_TEXT[spire.source]})`);

  // Check both remaining tools before failing, so one run reports everything that is missing.
  const problems: CliError[] = [];
  try {
    const m = await findMosquitto(io);
    out(`mosquitto ${m.version}  ${m.path}`);
  } catch (err) {
    if (!(err instanceof CliError)) throw err;
    out(`mosquitto: MISSING (${err.message})`);
    problems.push(err);
  }
  try {
    const o = await findOpenssl(io);
    out(`openssl ${o.version}`);
  } catch (err) {
    if (!(err instanceof CliError)) throw err;
    out(`openssl: MISSING`);
    problems.push(err);
  }
  if (problems.length > 0) {
    const first = problems[0];
    throw new CliError(
      problems.length === 1 ? first.message : problems.map((p) => p.message).join("; "),
      1,
      problems.map((p) => p.hint).filter(Boolean).join("; ") || undefined,
    );
  }
  out("Ready: run `k8s4r devenv start`.");
  return 0;
}
