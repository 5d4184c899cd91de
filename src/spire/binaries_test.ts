import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { bufferIo } from "../cli/io.ts";
import { CliError } from "../cli/errors.ts";
import { type OutputOptions, RecordingRunner } from "../process/mod.ts";
import {
  compareVersions,
  ensureSpireBinaries,
  findMosquitto,
  findSpireBinaries,
  parseGoVersion,
  parseMosquittoVersion,
  parseSha256Sums,
  parseSpireVersion,
  releasePlatform,
  releaseTarballName,
  spireCacheBinDir,
} from "./binaries.ts";
import { installCommand } from "./install.ts";

Deno.test("version parsing", () => {
  assert.equal(parseSpireVersion("1.13.3-dev-unk\n"), "1.13.3"); // go install build
  assert.equal(parseSpireVersion("1.13.3\n"), "1.13.3"); // release build
  assert.equal(parseSpireVersion("1.9.0\n"), "1.9.0");
  assert.equal(parseSpireVersion("Usage: spire-server"), undefined);
  assert.equal(parseGoVersion("go version go1.26.8 linux/amd64"), "1.26.8");
  assert.equal(parseGoVersion("go version go1.25 linux/amd64"), "1.25.0");
  assert.ok(compareVersions("1.26.8", "1.25.3") > 0);
  assert.ok(compareVersions("1.25.2", "1.25.3") < 0);
  assert.equal(compareVersions("1.25.3", "1.25.3"), 0);
  assert.equal(parseMosquittoVersion("mosquitto version 2.0.11\n\nUsage: ..."), "2.0.11");
  assert.equal(parseMosquittoVersion("mosquitto version 1.6.9\n"), "1.6.9");
  assert.equal(parseMosquittoVersion("bash: mosquitto: not found"), undefined);
  const h = "a".repeat(64);
  assert.deepEqual(
    [...parseSha256Sums(`# comment\n${h}  spire-1.13.3-linux-amd64-musl.tar.gz\nbad line\n`)],
    [["spire-1.13.3-linux-amd64-musl.tar.gz", h]],
  );
  assert.equal(releaseTarballName("linux-amd64"), "spire-1.13.3-linux-amd64-musl.tar.gz");
});

Deno.test("cache dir honours XDG_CACHE_HOME, then HOME", () => {
  assert.equal(
    spireCacheBinDir({ XDG_CACHE_HOME: "/x", HOME: "/h" }),
    "/x/k8s4r/spire/1.13.3/bin",
  );
  assert.equal(spireCacheBinDir({ HOME: "/h" }), "/h/.cache/k8s4r/spire/1.13.3/bin");
  assert.throws(() => spireCacheBinDir({}), /neither XDG_CACHE_HOME nor HOME/);
});

async function fakeBins(dir: string): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  for (const n of ["spire-server", "spire-agent"]) {
    await Deno.writeTextFile(`${dir}/${n}`, "#!/bin/sh\n", { mode: 0o755 });
  }
}

/** Answers `--version` like v1.13.3 (on stderr), per directory. */
function versionRunner(
  versions: Record<string, string>,
  extra?: (cmd: string, args: string[]) =>
    | {
      stdout?: string;
      stderr?: string;
      code?: number;
    }
    | Error
    | undefined,
) {
  return new RecordingRunner((cmd, args) => {
    if (args[0] === "--version") {
      const dir = cmd.slice(0, cmd.lastIndexOf("/"));
      const v = versions[dir];
      return v ? { stderr: `${v}\n` } : new Error("no such binary");
    }
    return extra?.(cmd, args) ?? new Error(`unexpected ${cmd} ${args.join(" ")}`);
  });
}

Deno.test("findSpireBinaries: env dir, then cache, then PATH (right version only)", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    const envDir = `${tmp}/envbin`;
    const cache = `${tmp}/cache/k8s4r/spire/1.13.3/bin`;
    const oldPath = `${tmp}/old`;
    const goodPath = `${tmp}/good`;
    await fakeBins(envDir);
    await fakeBins(oldPath);
    await fakeBins(goodPath);
    const versions: Record<string, string> = {
      [envDir]: "1.13.3-dev-unk",
      [oldPath]: "1.9.0",
      [goodPath]: "1.13.3",
      [cache]: "1.13.3-dev-unk",
    };
    const base = { HOME: `${tmp}/home`, XDG_CACHE_HOME: `${tmp}/cache` };

    let io = bufferIo({
      env: { ...base, K8S4R_SPIRE_BIN_DIR: envDir },
      runner: versionRunner(versions),
    });
    assert.deepEqual(await findSpireBinaries(io), {
      server: `${envDir}/spire-server`,
      agent: `${envDir}/spire-agent`,
      source: "env",
      version: "1.13.3",
    });

    io = bufferIo({
      env: { ...base, K8S4R_SPIRE_BIN_DIR: oldPath },
      runner: versionRunner(versions),
    });
    await assert.rejects(findSpireBinaries(io), (e: CliError) => {
      assert.match(
        e.message,
        /K8S4R_SPIRE_BIN_DIR=.*reports version 1\.9\.0, k8s4r needs 1\.13\.3/,
      );
      return true;
    });

    // PATH: the old one is skipped, the right one is found.
    io = bufferIo({
      env: { ...base, PATH: `${oldPath}:${goodPath}` },
      runner: versionRunner(versions),
    });
    assert.equal((await findSpireBinaries(io))?.source, "path");
    assert.equal((await findSpireBinaries(io))?.server, `${goodPath}/spire-server`);

    // Nothing at all.
    io = bufferIo({ env: { ...base, PATH: oldPath }, runner: versionRunner(versions) });
    assert.equal(await findSpireBinaries(io), undefined);

    // The cache wins over PATH.
    await fakeBins(cache);
    io = bufferIo({ env: { ...base, PATH: goodPath }, runner: versionRunner(versions) });
    assert.equal((await findSpireBinaries(io))?.source, "cache");
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("ensureSpireBinaries builds with Go through the tools module, then never again", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    const cache = `${tmp}/cache/k8s4r/spire/1.13.3/bin`;
    const toolsDir = `${tmp}/tools`;
    await Deno.mkdir(toolsDir);
    await Deno.writeTextFile(`${toolsDir}/go.mod`, "module k8s4r.local/spire-tools\n");
    const versions: Record<string, string> = { [cache]: "1.13.3-dev-unk" };
    const runner = versionRunner(versions, (cmd, args) => {
      if (cmd === "go" && args[0] === "version") {
        return { stdout: "go version go1.26.8 linux/amd64\n" };
      }
      if (cmd === "go" && args[0] === "mod") return {};
      if (cmd === "go" && args[0] === "install") {
        const gobin = (runner.calls.at(-1)!.opts as OutputOptions).env!.GOBIN;
        Deno.mkdirSync(gobin, { recursive: true });
        for (const n of ["spire-server", "spire-agent"]) {
          Deno.writeTextFileSync(`${gobin}/${n}`, "#!/bin/sh\n", { mode: 0o700 });
        }
        versions[gobin] = "1.13.3-dev-unk";
        return {};
      }
      return undefined;
    });
    const io = bufferIo({ env: { XDG_CACHE_HOME: `${tmp}/cache`, PATH: "" }, runner });
    const lines: string[] = [];
    const bins = await ensureSpireBinaries(io, (l) => lines.push(l), { toolsDir });
    assert.equal(bins.source, "built");
    assert.equal(bins.server, `${cache}/spire-server`);
    assert.equal((Deno.statSync(`${cache}/spire-agent`).mode ?? 0) & 0o777, 0o755);

    const goCalls = runner.calls.filter((c) => c.cmd === "go");
    assert.deepEqual(goCalls.map((c) => c.args), [
      ["version"],
      ["mod", "download"],
      [
        "install",
        "-trimpath",
        "github.com/spiffe/spire/cmd/spire-server",
        "github.com/spiffe/spire/cmd/spire-agent",
      ],
    ]);
    const opts = goCalls[2].opts as OutputOptions;
    assert.equal(opts.cwd, toolsDir);
    assert.equal(opts.env?.CGO_ENABLED, "1");
    assert.equal(opts.env?.GOTOOLCHAIN, "local");
    assert.match(opts.env!.GOBIN, new RegExp(`^${tmp}/cache/k8s4r/spire/1\\.13\\.3/\\.staging-`));
    // Progress: a line per phase, with elapsed time; staging removed afterwards.
    assert.ok(
      lines.some((l) => /^\[2\/3\] compile spire-server and spire-agent.*: done \(\d+s\)$/.test(l)),
    );
    assert.deepEqual(
      [...Deno.readDirSync(`${tmp}/cache/k8s4r/spire/1.13.3`)].map((e) => e.name),
      ["bin"],
    );

    // Second run: found in the cache, no Go involved.
    const before = runner.calls.length;
    assert.equal((await ensureSpireBinaries(io, () => {}, { toolsDir })).source, "cache");
    assert.equal(runner.calls.slice(before).filter((c) => c.cmd === "go").length, 0);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("ensureSpireBinaries: a failed build names the step and what to do", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    const toolsDir = `${tmp}/tools`;
    await Deno.mkdir(toolsDir);
    await Deno.writeTextFile(`${tmp}/tools/go.mod`, "module x\n");
    const runner = versionRunner({}, (cmd, args) => {
      if (cmd === "go" && args[0] === "version") {
        return { stdout: "go version go1.25.3 linux/amd64" };
      }
      if (cmd === "go" && args[0] === "mod") {
        return { code: 1, stderr: "dial tcp: lookup proxy.golang.org: no such host" };
      }
      return undefined;
    });
    const io = bufferIo({ env: { XDG_CACHE_HOME: `${tmp}/cache` }, runner });
    await assert.rejects(ensureSpireBinaries(io, () => {}, { toolsDir }), (e: CliError) => {
      assert.match(
        e.message,
        /failed at step "download Go modules \(go mod download\)".*no such host/,
      );
      assert.match(e.hint ?? "", /GOPROXY/);
      return true;
    });
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("download path: refuses without a committed checksum, verifies it otherwise", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    const cache = `${tmp}/cache/k8s4r/spire/1.13.3/bin`;
    // A tarball shaped like the official one.
    const src = `${tmp}/src/spire-1.13.3/bin`;
    await fakeBins(src);
    new Deno.Command("tar", {
      args: ["-czf", `${tmp}/rel.tgz`, "-C", `${tmp}/src`, "spire-1.13.3"],
    })
      .outputSync();
    const tarball = await Deno.readFile(`${tmp}/rel.tgz`);
    const sha = createHash("sha256").update(tarball).digest("hex");
    const versions: Record<string, string> = { [cache]: "1.13.3" };
    const runner = versionRunner(versions, (cmd, args) => {
      if (cmd === "go") return new CliError("go: command not found");
      if (cmd === "tar") {
        const out = new Deno.Command("tar", { args }).outputSync();
        const dir = args[args.indexOf("-C") + 1];
        versions[`${dir}/spire-1.13.3/bin`] = "1.13.3";
        return { code: out.code };
      }
      return undefined;
    });
    let fetched: string[] = [];
    const fakeFetch = ((url: string) => {
      fetched.push(url);
      return Promise.resolve(new Response(tarball));
    }) as unknown as typeof fetch;
    const io = bufferIo({ env: { XDG_CACHE_HOME: `${tmp}/cache` }, runner });
    const file = releaseTarballName(releasePlatform()!);

    await Deno.writeTextFile(`${tmp}/SUMS`, "# no checksum known\n");
    await assert.rejects(
      ensureSpireBinaries(io, () => {}, {
        checksumsFile: `${tmp}/SUMS`,
        fetch: fakeFetch,
        toolsDir: tmp,
      }),
      /no SHA-256 for spire-1\.13\.3-linux-.*-musl\.tar\.gz is committed .*refuses to download/,
    );
    assert.deepEqual(fetched, []);

    await Deno.writeTextFile(`${tmp}/SUMS`, `${"0".repeat(64)}  ${file}\n`);
    await assert.rejects(
      ensureSpireBinaries(io, () => {}, {
        checksumsFile: `${tmp}/SUMS`,
        fetch: fakeFetch,
        toolsDir: tmp,
      }),
      /step "verify SHA-256 of .*checksum mismatch/,
    );
    fetched = [];
    await Deno.writeTextFile(`${tmp}/SUMS`, `${sha}  ${file}\n`);
    const bins = await ensureSpireBinaries(io, () => {}, {
      checksumsFile: `${tmp}/SUMS`,
      fetch: fakeFetch,
      toolsDir: tmp,
    });
    assert.equal(bins.source, "downloaded");
    assert.deepEqual(fetched, [
      `https://github.com/spiffe/spire/releases/download/v1.13.3/${file}`,
    ]);
    assert.ok(Deno.statSync(`${cache}/spire-agent`).isFile);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("findMosquitto: 2.x on PATH, a clear error with an install hint otherwise", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    await Deno.mkdir(`${tmp}/a`);
    await Deno.writeTextFile(`${tmp}/a/mosquitto`, "", { mode: 0o755 });
    const runner = new RecordingRunner(() => ({
      code: 3,
      stdout: "mosquitto version 2.0.11\n\nUsage:",
    }));
    assert.deepEqual(await findMosquitto(bufferIo({ env: { PATH: `${tmp}/a` }, runner })), {
      path: `${tmp}/a/mosquitto`,
      version: "2.0.11",
    });
    assert.deepEqual(runner.calls[0].args, ["-h"]);
    const old = new RecordingRunner(() => ({ stdout: "mosquitto version 1.6.9\n" }));
    await assert.rejects(
      findMosquitto(bufferIo({ env: { PATH: `${tmp}/a` }, runner: old })),
      /mosquitto 2\.x is required, but .* reports version 1\.6\.9/,
    );
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("installCommand prints what it found and where", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "k8s4r-" });
  try {
    const cache = `${tmp}/home/.cache/k8s4r/spire/1.13.3/bin`;
    await fakeBins(cache);
    await Deno.mkdir(`${tmp}/pathbin`);
    await Deno.writeTextFile(`${tmp}/pathbin/mosquitto`, "", { mode: 0o755 });
    const runner = versionRunner({ [cache]: "1.13.3-dev-unk" }, (cmd) => {
      if (cmd.endsWith("/mosquitto")) return { stdout: "mosquitto version 2.0.11\n" };
      if (cmd === "openssl") return { stdout: "OpenSSL 3.0.19 27 Jan 2026\n" };
      return undefined;
    });
    const io = bufferIo({ env: { HOME: `${tmp}/home`, PATH: `${tmp}/pathbin` }, runner });
    assert.equal(await installCommand(undefined, io), 0);
    assert.equal(
      io.out(),
      [
        "Provisioning SPIRE 1.13.3",
        "  spire-server 1.13.3  ~/.cache/k8s4r/spire/1.13.3/bin/spire-server",
        "  spire-agent  1.13.3  ~/.cache/k8s4r/spire/1.13.3/bin/spire-agent",
        "  (already in the k8s4r cache)",
        `mosquitto 2.0.11  ${tmp}/pathbin/mosquitto`,
        "openssl 3.0.19",
        "Ready: run `k8s4r devenv start`.",
        "",
      ].join("\n"),
    );

    // Without mosquitto on PATH (nor in /usr/sbin of this fake): a CliError with a hint.
    const noMosq = versionRunner({ [cache]: "1.13.3" }, (cmd) => {
      if (cmd === "openssl") return { stdout: "OpenSSL 3.0.19\n" };
      if (cmd.endsWith("/mosquitto")) return { stdout: "" };
      return undefined;
    });
    const io2 = bufferIo({ env: { HOME: `${tmp}/home`, PATH: `${tmp}/nothing` }, runner: noMosq });
    await assert.rejects(installCommand(undefined, io2), (e: CliError) => {
      assert.match(e.message, /mosquitto/);
      assert.match(e.hint ?? "", /apt-get install -y mosquitto mosquitto-clients/);
      return true;
    });
    assert.match(io2.out(), /mosquitto: MISSING/);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});
