/**
 * Finding and provisioning the pinned SPIRE release (`SPIRE_VERSION`) and Mosquitto 2.x.
 *
 * Lookup order for spire-server/spire-agent:
 *   1. `$K8S4R_SPIRE_BIN_DIR` (explicit; a wrong version there is an error, not a fallback);
 *   2. the cache `${XDG_CACHE_HOME:-$HOME/.cache}/k8s4r/spire/<version>/bin/`;
 *   3. `PATH`, only when both binaries report the pinned version.
 * When none has them, `ensureSpireBinaries` builds them with Go (>= 1.25.3) from the tools module
 * committed at `scripts/spire-tools/` (go.mod pins every dependency, go.sum verifies them), or
 * downloads the official musl release tarball and checks it against the SHA-256 committed in
 * `scripts/spire-tools/SHA256SUMS`. Either way the result is moved into the cache atomically, so
 * a half-finished install is never picked up.
 */
import { createHash } from "node:crypto";
import { delimiter, dirname, join } from "node:path";
import { CliError } from "../cli/errors.ts";
import { importLater } from "../cli/import_later.ts";
import type { Io } from "../cli/io.ts";
import { SPIRE_VERSION } from "../version.ts";

/**
 * The embedded tools module and release checksums (~0.5 MB of strings), loaded only when SPIRE
 * is provisioned: `k8s4r agent` imports this file for `findSpireBinaries` and keeps them out
 * of its memory (docs/BENCHMARKS.md, agent memory). `importLater`: a literal `import()` would
 * have Deno read and keep the module anyway.
 */
const embeddedTools = () =>
  importLater<typeof import("./embedded_tools.ts")>(
    new URL("./embedded_tools.ts", import.meta.url),
  );

export interface SpireBinaries {
  server: string;
  agent: string;
  source: "env" | "cache" | "path" | "built" | "downloaded";
  version: string;
}

/** Go release that SPIRE v1.13.3's go.mod requires. */
export const MIN_GO_VERSION = "1.25.3";

const SPIRE_MODULE = "github.com/spiffe/spire";
const BINARY_NAMES = ["spire-server", "spire-agent"] as const;

/** Where the embedded tools module is documented and maintained (scripts/spire-tools). */
const TOOLS_SOURCE = "scripts/spire-tools (embedded in src/spire/embedded_tools.ts)";

/** `${XDG_CACHE_HOME:-$HOME/.cache}/k8s4r/spire/<version>/bin`. */
export function spireCacheBinDir(
  env: Record<string, string | undefined>,
  version = SPIRE_VERSION,
): string {
  const xdg = env["XDG_CACHE_HOME"];
  const home = env["HOME"];
  const base = xdg && xdg.startsWith("/") ? xdg : home ? join(home, ".cache") : undefined;
  if (!base) {
    throw new CliError(
      "cannot locate the SPIRE cache: neither XDG_CACHE_HOME nor HOME is set",
      1,
      "set HOME, or point K8S4R_SPIRE_BIN_DIR at a directory holding spire-server and spire-agent",
    );
  }
  return join(base, "k8s4r", "spire", version, "bin");
}

/**
 * The version a SPIRE binary reports. v1.13.3 prints it for `--version` (on stderr, through
 * mitchellh/cli): `1.13.3` for release builds, `1.13.3-dev-unk` for `go install` builds, which
 * carry no git tag.
 */
export function parseSpireVersion(text: string): string | undefined {
  const m = text.match(/(?:^|\s|v)(\d+\.\d+\.\d+)(?:-[0-9A-Za-z.-]+)?(?:\s|$)/);
  return m?.[1];
}

/** `go version go1.26.8 linux/amd64` -> `1.26.8`. `go1.25` (no patch) -> `1.25.0`. */
export function parseGoVersion(text: string): string | undefined {
  const m = text.match(/\bgo(\d+)\.(\d+)(?:\.(\d+))?/);
  return m ? `${m[1]}.${m[2]}.${m[3] ?? "0"}` : undefined;
}

/** Numeric comparison of dotted versions: negative, 0 or positive. */
export function compareVersions(a: string, b: string): number {
  const pa = a.split(".").map(Number);
  const pb = b.split(".").map(Number);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return d;
  }
  return 0;
}

async function isExecutable(path: string): Promise<boolean> {
  try {
    const st = await Deno.stat(path);
    return st.isFile && ((st.mode ?? 0o755) & 0o111) !== 0;
  } catch {
    return false;
  }
}

/** Runs `<bin> --version` and returns the reported version, or undefined. */
export async function spireBinaryVersion(io: Io, bin: string): Promise<string | undefined> {
  try {
    const r = await io.runner.output(bin, ["--version"], { check: false, timeoutMs: 15_000 });
    return parseSpireVersion(`${r.stdout}\n${r.stderr}`);
  } catch {
    return undefined;
  }
}

/** Both binaries in `dir`, if present, executable, and of the pinned version. */
async function checkDir(
  io: Io,
  dir: string,
): Promise<{ ok: true; server: string; agent: string } | { ok: false; why: string }> {
  const server = join(dir, "spire-server");
  const agent = join(dir, "spire-agent");
  for (const bin of [server, agent]) {
    if (!(await isExecutable(bin))) return { ok: false, why: `${bin} is missing` };
    const v = await spireBinaryVersion(io, bin);
    if (v !== SPIRE_VERSION) {
      return {
        ok: false,
        why: `${bin} reports version ${v ?? "(none)"}, k8s4r needs ${SPIRE_VERSION}`,
      };
    }
  }
  return { ok: true, server, agent };
}

function findOnPath(env: Record<string, string | undefined>, name: string): string[] {
  const dirs = (env["PATH"] ?? "").split(delimiter).filter((d) => d.startsWith("/"));
  return dirs.map((d) => join(d, name));
}

/** Finds installed SPIRE binaries of the pinned version. Never installs anything. */
export async function findSpireBinaries(io: Io): Promise<SpireBinaries | undefined> {
  const envDir = io.env["K8S4R_SPIRE_BIN_DIR"];
  if (envDir) {
    const r = await checkDir(io, envDir);
    if (!r.ok) {
      throw new CliError(
        `K8S4R_SPIRE_BIN_DIR=${envDir}: ${r.why}`,
        1,
        `put spire-server and spire-agent ${SPIRE_VERSION} there, or unset K8S4R_SPIRE_BIN_DIR to use the k8s4r cache`,
      );
    }
    return { server: r.server, agent: r.agent, source: "env", version: SPIRE_VERSION };
  }
  const cache = await checkDir(io, spireCacheBinDir(io.env));
  if (cache.ok) {
    return { server: cache.server, agent: cache.agent, source: "cache", version: SPIRE_VERSION };
  }
  // PATH: the first directory that has a spire-server of the right version and its agent.
  for (const server of findOnPath(io.env, "spire-server")) {
    if (!(await isExecutable(server))) continue;
    const r = await checkDir(io, dirname(server));
    if (r.ok) return { server: r.server, agent: r.agent, source: "path", version: SPIRE_VERSION };
  }
  return undefined;
}

export interface EnsureOptions {
  /** The Go tools module (default: `scripts/spire-tools/` of this checkout). */
  toolsDir?: string;
  /** The committed checksum list (default: `<toolsDir>/SHA256SUMS`). */
  checksumsFile?: string;
  /** Injected for tests; defaults to the global fetch. */
  fetch?: typeof fetch;
  /** Go build timeout. Default 60 minutes (a cold build takes 5-15 minutes on 2 cores). */
  buildTimeoutMs?: number;
}

/**
 * Returns the pinned SPIRE binaries, provisioning them into the cache when nothing has them.
 * `progress` gets one line per step (the Go build takes minutes).
 */
export async function ensureSpireBinaries(
  io: Io,
  progress: (line: string) => void = () => {},
  opts: EnsureOptions = {},
): Promise<SpireBinaries> {
  const found = await findSpireBinaries(io);
  if (found) return found;
  const cacheBin = spireCacheBinDir(io.env);
  progress(`SPIRE ${SPIRE_VERSION} not found (K8S4R_SPIRE_BIN_DIR, ${cacheBin}, PATH)`);

  const go = await detectGo(io);
  if (go && compareVersions(go.version, MIN_GO_VERSION) >= 0) {
    progress(`found Go ${go.version}: building SPIRE ${SPIRE_VERSION} from the Go module proxy`);
    await buildWithGo(io, cacheBin, progress, opts);
    const r = await checkDir(io, cacheBin);
    if (!r.ok) throw new CliError(`SPIRE build finished but ${r.why}`);
    return { server: r.server, agent: r.agent, source: "built", version: SPIRE_VERSION };
  }
  progress(
    go
      ? `Go ${go.version} is older than ${MIN_GO_VERSION}: downloading the release tarball instead`
      : `Go not found: downloading the release tarball instead`,
  );
  await downloadRelease(io, cacheBin, progress, opts);
  const r = await checkDir(io, cacheBin);
  if (!r.ok) throw new CliError(`SPIRE download finished but ${r.why}`);
  return { server: r.server, agent: r.agent, source: "downloaded", version: SPIRE_VERSION };
}

async function detectGo(io: Io): Promise<{ version: string } | undefined> {
  try {
    const r = await io.runner.output("go", ["version"], { check: false, timeoutMs: 30_000 });
    if (!r.success) return undefined;
    const v = parseGoVersion(r.stdout);
    return v ? { version: v } : undefined;
  } catch {
    return undefined;
  }
}

function elapsed(start: number): string {
  const s = Math.round((Date.now() - start) / 1000);
  return s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

/** A private staging dir next to the cache, so the final rename stays on one filesystem. */
async function stagingDir(cacheBin: string): Promise<string> {
  const parent = dirname(cacheBin);
  await Deno.mkdir(parent, { recursive: true });
  return await Deno.makeTempDir({ dir: parent, prefix: ".staging-" });
}

/** Moves the two binaries from `fromDir` into the cache, one atomic rename each. */
async function installInto(fromDir: string, cacheBin: string): Promise<void> {
  await Deno.mkdir(cacheBin, { recursive: true });
  // The agent first: a reader that sees the server (checked first) then finds both.
  for (const name of ["spire-agent", "spire-server"]) {
    await Deno.chmod(join(fromDir, name), 0o755);
    await Deno.rename(join(fromDir, name), join(cacheBin, name));
  }
}

async function step<T>(
  progress: (line: string) => void,
  label: string,
  what: string,
  fn: () => Promise<T>,
): Promise<T> {
  const start = Date.now();
  progress(`${label} ${what}...`);
  try {
    const v = await fn();
    progress(`${label} ${what}: done (${elapsed(start)})`);
    return v;
  } catch (err) {
    const msg = err instanceof Error ? err.message.split("\n")[0] : String(err);
    const hint = err instanceof CliError ? err.hint : undefined;
    throw new CliError(`SPIRE install failed at step "${what}": ${msg}`, 1, hint);
  }
}

async function buildWithGo(
  io: Io,
  cacheBin: string,
  progress: (line: string) => void,
  opts: EnsureOptions,
): Promise<void> {
  const staging = await stagingDir(cacheBin);
  // The tools module is embedded in k8s4r (a compiled binary has no source tree): write it out
  // into the staging dir, where `go` can read it, unless a test points at its own.
  let toolsDir = opts.toolsDir;
  if (!toolsDir) {
    toolsDir = join(staging, "tools");
    await Deno.mkdir(toolsDir, { recursive: true });
    const { TOOLS_GO_MOD, TOOLS_GO_SUM } = await embeddedTools();
    await Deno.writeTextFile(join(toolsDir, "go.mod"), TOOLS_GO_MOD);
    await Deno.writeTextFile(join(toolsDir, "go.sum"), TOOLS_GO_SUM);
  }
  const hint =
    `check network access to the Go module proxy (GOPROXY) and that gcc is installed (cgo), ` +
    `or set K8S4R_SPIRE_BIN_DIR to a directory holding spire-server and spire-agent ${SPIRE_VERSION}`;
  try {
    await Deno.stat(join(toolsDir, "go.mod"));
  } catch {
    await Deno.remove(staging, { recursive: true }).catch(() => {});
    throw new CliError(
      `SPIRE install failed: the Go tools module ${toolsDir} is missing (go.mod)`,
      1,
      hint,
    );
  }
  // GOTOOLCHAIN=local: never let go.mod's `go` line trigger a toolchain download.
  const env = {
    CGO_ENABLED: "1",
    GOTOOLCHAIN: "local",
    GOBIN: join(staging, "bin"),
    GOFLAGS: "-mod=readonly",
  };
  const packages = BINARY_NAMES.map((n) => `${SPIRE_MODULE}/cmd/${n}`);
  const go = async (args: string[]) => {
    await io.runner.output("go", args, {
      cwd: toolsDir,
      env,
      timeoutMs: opts.buildTimeoutMs ?? 60 * 60_000,
      signal: io.signal,
    }).catch((e) => {
      throw new CliError(e.message, 1, hint);
    });
  };
  try {
    await step(
      progress,
      "[1/3]",
      "download Go modules (go mod download)",
      () => go(["mod", "download"]),
    );
    await step(
      progress,
      "[2/3]",
      "compile spire-server and spire-agent (go install, takes several minutes)",
      () => go(["install", "-trimpath", ...packages]),
    );
    await step(progress, "[3/3]", `verify and install into ${cacheBin}`, async () => {
      const r = await checkDir(io, join(staging, "bin"));
      if (!r.ok) throw new CliError(r.why);
      await installInto(join(staging, "bin"), cacheBin);
    });
  } finally {
    await Deno.remove(staging, { recursive: true }).catch(() => {});
  }
}

/** `linux-amd64` style platform name used by SPIRE release tarballs, or undefined. */
export function releasePlatform(
  os: string = Deno.build.os,
  arch: string = Deno.build.arch,
): string | undefined {
  if (os !== "linux") return undefined;
  if (arch === "x86_64") return "linux-amd64";
  if (arch === "aarch64") return "linux-arm64";
  return undefined;
}

export function releaseTarballName(platform: string, version = SPIRE_VERSION): string {
  return `spire-${version}-${platform}-musl.tar.gz`;
}

/** Parses `sha256sum` output format: `<64 hex>  <file>` per line; `#` comments allowed. */
export function parseSha256Sums(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([0-9a-fA-F]{64})\s+\*?(\S+)$/);
    if (m) out.set(m[2], m[1].toLowerCase());
  }
  return out;
}

async function downloadRelease(
  io: Io,
  cacheBin: string,
  progress: (line: string) => void,
  opts: EnsureOptions,
): Promise<void> {
  const hint =
    `install Go >= ${MIN_GO_VERSION} (k8s4r then builds SPIRE from the Go module proxy), or set ` +
    `K8S4R_SPIRE_BIN_DIR to a directory holding spire-server and spire-agent ${SPIRE_VERSION}`;
  const platform = releasePlatform();
  if (!platform) {
    throw new CliError(
      `SPIRE install failed: no official SPIRE release for ${Deno.build.os}/${Deno.build.arch}`,
      1,
      hint,
    );
  }
  const file = releaseTarballName(platform);
  const sumsFile = opts.checksumsFile ?? `${TOOLS_SOURCE}/SHA256SUMS`;
  let sums = new Map<string, string>();
  try {
    sums = parseSha256Sums(
      opts.checksumsFile
        ? await Deno.readTextFile(opts.checksumsFile)
        : (await embeddedTools()).RELEASE_SHA256SUMS,
    );
  } catch { /* treated as "no checksum" below */ }
  const expected = sums.get(file);
  if (!expected) {
    // Never run an unverified binary: without a committed checksum there is no download.
    throw new CliError(
      `SPIRE install failed: no SHA-256 for ${file} is committed in ${sumsFile}, so k8s4r ` +
        `refuses to download an unverified release`,
      1,
      hint,
    );
  }
  const url = `https://github.com/spiffe/spire/releases/download/v${SPIRE_VERSION}/${file}`;
  const staging = await stagingDir(cacheBin);
  try {
    const tarball = join(staging, file);
    await step(progress, "[1/3]", `download ${url}`, async () => {
      const res = await (opts.fetch ?? fetch)(url, { signal: io.signal });
      if (!res.ok || !res.body) {
        await res.body?.cancel();
        throw new CliError(`HTTP ${res.status} ${res.statusText}`, 1, hint);
      }
      const bytes = new Uint8Array(await res.arrayBuffer());
      await Deno.writeFile(tarball, bytes, { mode: 0o600 });
    });
    await step(progress, "[2/3]", `verify SHA-256 of ${file}`, async () => {
      const actual = createHash("sha256").update(await Deno.readFile(tarball)).digest("hex");
      if (actual !== expected) {
        throw new CliError(`checksum mismatch: expected ${expected}, got ${actual}`, 1, hint);
      }
    });
    await step(progress, "[3/3]", `unpack into ${cacheBin}`, async () => {
      const top = `spire-${SPIRE_VERSION}`;
      await io.runner.output("tar", [
        "-xzf",
        tarball,
        "-C",
        staging,
        ...BINARY_NAMES.map((n) => `${top}/bin/${n}`),
      ]);
      const r = await checkDir(io, join(staging, top, "bin"));
      if (!r.ok) throw new CliError(r.why);
      await installInto(join(staging, top, "bin"), cacheBin);
    });
  } finally {
    await Deno.remove(staging, { recursive: true }).catch(() => {});
  }
}

/** Parses the first line of `mosquitto -h`: `mosquitto version 2.0.11`. */
export function parseMosquittoVersion(text: string): string | undefined {
  const first = text.split("\n").find((l) => l.trim() !== "") ?? "";
  return first.match(/^mosquitto version (\d+\.\d+(?:\.\d+)?)/)?.[1];
}

const MOSQUITTO_HINT = "install it: `apt-get install -y mosquitto mosquitto-clients` " +
  "(Debian/Ubuntu) or `brew install mosquitto` (macOS), or run the stack in docker mode";

/** Where packages put `mosquitto` outside a non-root PATH (Debian: /usr/sbin). */
export const MOSQUITTO_SBIN_PATHS = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"] as const;

/** Finds `mosquitto` 2.x on PATH or in MOSQUITTO_SBIN_PATHS. */
export async function findMosquitto(io: Io): Promise<{ path: string; version: string }> {
  const candidates = [...findOnPath(io.env, "mosquitto"), ...MOSQUITTO_SBIN_PATHS];
  let wrong: string | undefined;
  for (const path of [...new Set(candidates)]) {
    if (!(await isExecutable(path))) continue;
    let version: string | undefined;
    try {
      // `mosquitto -h` prints the version on its first line and exits non-zero.
      const r = await io.runner.output(path, ["-h"], { check: false, timeoutMs: 10_000 });
      version = parseMosquittoVersion(r.stdout) ?? parseMosquittoVersion(r.stderr);
    } catch {
      version = undefined;
    }
    if (version && version.startsWith("2.")) return { path, version };
    wrong = `${path} reports ${version ? `version ${version}` : "no version"}`;
  }
  throw new CliError(
    wrong ? `mosquitto 2.x is required, but ${wrong}` : "mosquitto 2.x not found on PATH",
    1,
    MOSQUITTO_HINT,
  );
}

/** Used in messages: `~/.cache/...` reads better than the full path. */
export function displayPath(path: string, env: Record<string, string | undefined>): string {
  const home = env["HOME"];
  return home && path.startsWith(home + "/") ? `~/${path.slice(home.length + 1)}` : path;
}
