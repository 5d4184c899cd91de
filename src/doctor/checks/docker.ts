/** docker (only with --broker docker): the engine, and the broker container's state and log. */
import { type Check, type CheckContext, fail, ok, type TimeoutSpec } from "../check.ts";
import { commandHangHint } from "./common.ts";

const dockerTimeout: TimeoutSpec = {
  hint: () =>
    `${
      commandHangHint("docker info", "the Docker daemon does not answer")
    }; sudo systemctl status docker; sudo systemctl restart docker`,
};

function docker(ctx: CheckContext, args: string[]) {
  return ctx.runner.output("docker", args, {
    check: false,
    timeoutMs: ctx.timeoutMs,
    signal: ctx.signal,
  });
}

const engine: Check = {
  id: "docker.engine",
  group: "docker",
  title: "Docker engine reachable",
  timeout: dockerTimeout,
  async run(ctx) {
    let r;
    try {
      r = await docker(ctx, ["info", "--format", "{{.ServerVersion}}"]);
    } catch (err) {
      return fail(`docker: ${(err as Error).message}`, "install Docker, or use --broker native");
    }
    if (!r.success) {
      const why = r.stderr.trim().split("\n").pop() || `exit ${r.code}`;
      return fail(
        `docker info failed: ${why}`,
        "sudo systemctl start docker   # or use --broker native",
      );
    }
    return ok(`Docker engine ${r.stdout.trim()}`);
  },
};

const container: Check = {
  id: "docker.container",
  group: "docker",
  title: "broker container running",
  timeout: dockerTimeout,
  dependsOn: ["docker.engine"],
  async run(ctx) {
    const name = ctx.options.container;
    const r = await docker(ctx, [
      "inspect",
      "--format",
      "{{.State.Status}} {{.State.ExitCode}}",
      name,
    ]);
    if (!r.success) {
      return fail(`no container ${name}`, "k8s4r devenv start --broker docker");
    }
    const [status, exit] = r.stdout.trim().split(/\s+/);
    if (status === "running") return ok(`${name} is running`);
    const logs = await docker(ctx, ["logs", "--tail", "20", name]);
    const lines = `${logs.stdout}${logs.stderr}`.split("\n").filter((l) => l.trim()).slice(-20);
    return fail(
      `${name} is ${status} (exit code ${exit})${
        lines.length ? `: ${lines[lines.length - 1]}` : ""
      }`,
      `docker logs ${name}   # then: k8s4r devenv stop && k8s4r devenv start --broker docker`,
      lines,
    );
  },
};

export const dockerChecks: Check[] = [engine, container];
