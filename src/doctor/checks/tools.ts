/** tools: the binaries k8s4r drives, found and of the right version. */
import { SPIRE_VERSION } from "../../version.ts";
import {
  type Check,
  type CheckContext,
  type CheckResult,
  type DoctorFs,
  fail,
  ok,
  warn,
} from "../check.ts";
import { MOSQUITTO_SBIN_PATHS } from "../../spire/binaries.ts";
import { errorMessage } from "../../cli/errors.ts";
import { commandHangHint, K8S4R } from "./common.ts";

async function versionOf(ctx: CheckContext, bin: string, args: string[]): Promise<string> {
  const r = await ctx.runner.output(bin, args, {
    check: false,
    timeoutMs: ctx.timeoutMs,
    signal: ctx.signal,
  });
  return `${r.stdout}\n${r.stderr}`;
}

function spireCheck(which: "server" | "agent"): Check {
  const name = `spire-${which}`;
  return {
    id: `tools.${name}`,
    group: "tools",
    title: `${name} ${SPIRE_VERSION}`,
    timeoutMs: 3000,
    timeout: {
      hint: () =>
        `${
          commandHangHint(`${name} --version`, `finding or asking ${name} hangs (a slow disk?)`)
        }; or reinstall it: ${K8S4R} devenv install`,
    },
    async run(ctx): Promise<CheckResult> {
      let found;
      try {
        found = await ctx.memo("spire-binaries", () => ctx.spire.findBinaries());
      } catch (err) {
        return fail(errorMessage(err), `${K8S4R} devenv install`);
      }
      if (found) {
        const path = which === "server" ? found.server : found.agent;
        return ok(`${path} (${found.version ?? SPIRE_VERSION}, from ${found.source})`);
      }
      // Not usable: say what is there instead, if anything.
      const onPath = await ctx.fs.which(name);
      if (onPath) {
        const v = /(\d+\.\d+\.\d+)/.exec(await versionOf(ctx, onPath, ["--version"]))?.[1];
        return fail(
          `${onPath} is version ${v ?? "unknown"}, k8s4r needs ${SPIRE_VERSION}`,
          `${K8S4R} devenv install   # provisions SPIRE ${SPIRE_VERSION} into ~/.cache/k8s4r`,
        );
      }
      return fail(
        `${name} ${SPIRE_VERSION} not found (K8S4R_SPIRE_BIN_DIR, ~/.cache/k8s4r/spire/${SPIRE_VERSION}/bin, PATH)`,
        `${K8S4R} devenv install`,
      );
    },
  };
}

/** The mosquitto binary: on PATH, or in /usr/sbin, which a non-root PATH lacks. */
export async function locateMosquitto(fs: DoctorFs): Promise<string | undefined> {
  const p = await fs.which("mosquitto");
  if (p) return p;
  for (const c of MOSQUITTO_SBIN_PATHS) {
    if ((await fs.stat(c))?.isFile) return c;
  }
  return undefined;
}

const mosquittoCheck: Check = {
  id: "tools.mosquitto",
  group: "tools",
  title: "mosquitto 2.x",
  timeout: {
    hint: (ctx) =>
      ctx.options.broker === "docker"
        ? `${
          commandHangHint("docker info", "the Docker daemon does not answer")
        }; sudo systemctl status docker`
        : commandHangHint("mosquitto -h", "the mosquitto binary hangs (a slow disk?)"),
  },
  async run(ctx) {
    if (ctx.options.broker === "docker") {
      const docker = await ctx.fs.which("docker");
      if (!docker) {
        return fail(
          "docker not found on PATH (--broker docker)",
          "install Docker, or run: k8s4r doctor --broker native",
        );
      }
      const r = await ctx.runner.output("docker", ["info", "--format", "{{.ServerVersion}}"], {
        check: false,
        timeoutMs: ctx.timeoutMs,
        signal: ctx.signal,
      });
      if (!r.success) {
        const why = r.stderr.trim().split("\n").pop() || `exit ${r.code}`;
        return fail(
          `Docker engine not reachable: ${why}`,
          "start Docker (sudo systemctl start docker), or use --broker native",
        );
      }
      return ok(`Docker engine ${r.stdout.trim()} (broker runs as eclipse-mosquitto:2.0)`);
    }
    const bin = await locateMosquitto(ctx.fs);
    if (!bin) {
      return fail(
        "mosquitto not found on PATH or in /usr/sbin",
        "sudo apt-get install mosquitto   # or: k8s4r devenv start --broker docker",
      );
    }
    const out = await versionOf(ctx, bin, ["-h"]);
    const v = /mosquitto version (\d+)\.(\d+)\.(\d+)/.exec(out);
    if (!v) return fail(`${bin} did not report a version`, `${bin} -h`);
    const version = `${v[1]}.${v[2]}.${v[3]}`;
    if (v[1] !== "2") {
      return fail(
        `${bin} is version ${version}, k8s4r needs 2.x`,
        "sudo apt-get install mosquitto   # Debian 12 ships 2.0.11",
      );
    }
    if (Number(v[2]) === 0 && Number(v[3]) < 21) {
      // Only 2.0.11 and 2.0.21 were tested; 2.0.21 is the one k8s4r is tested with.
      return warn(
        `${bin} is ${version}, older than 2.0.21 (bookworm-backports), the version k8s4r is tested with; 2.0.11 crashed in our tests under frequent SIGHUPs (a SIGHUP every few seconds; 2.0.21 did too; k8s4r sends one only when the broker's certificate changed)`,
        "apt-get install -y -t bookworm-backports mosquitto mosquitto-clients   # 2.0.21 (README: Prerequisites)",
      );
    }
    return ok(`${bin} (${version})`);
  },
};

const opensslCheck: Check = {
  id: "tools.openssl",
  group: "tools",
  title: "openssl",
  timeout: { hint: () => commandHangHint("openssl version", "the openssl binary hangs") },
  async run(ctx) {
    const bin = await ctx.fs.which("openssl");
    if (!bin) return fail("openssl not found on PATH", "sudo apt-get install openssl");
    const out = await versionOf(ctx, bin, ["version"]);
    const v = /OpenSSL (\S+)/.exec(out)?.[1];
    if (!v) return fail(`${bin} did not report a version`, `${bin} version`);
    return ok(`${bin} (OpenSSL ${v})`);
  },
};

export const toolChecks: Check[] = [
  spireCheck("server"),
  spireCheck("agent"),
  mosquittoCheck,
  opensslCheck,
];
