/**
 * The dev stack's paths, as the doctor and `k8s4r robot` see them. The CLI composition is the one place that
 * joins the two: the doctor is production code and never imports devenv; devenv owns its layout.
 */
import { existsSync } from "node:fs";
import { containerName } from "../devenv/broker_argv.ts";
import { devenvComponents, stackView } from "../devenv/components.ts";
import { resolveContext } from "../devenv/context.ts";
import { defaultLayout, devenvFiles, robotLayout } from "../devenv/layout.ts";
import type { StackComponents, StackPaths } from "../doctor/check.ts";
import { Args } from "./mod.ts";

/** Where a dev stack in `cwd` keeps its control-host config (`k8s4r robot ...` reads it). */
export const devControlConfig = (cwd: string, env: Record<string, string | undefined>): string =>
  defaultLayout(cwd, env).controlHostConfig;

export const devStackPaths: StackPaths = (cwd, env, robotId) => {
  const layout = defaultLayout(cwd, env);
  const f = devenvFiles(layout, env);
  const r = robotLayout(layout, robotId, env);
  return {
    layout: {
      root: layout.root,
      trustDomain: layout.trustDomain,
      ports: layout.ports,
      spireServerSocket: layout.spireServerSocket,
      spireServerConfig: layout.spireServerConfig,
      agentPluginsYaml: layout.agentPluginsYaml,
      caBundleFile: layout.caBundleFile,
      mosquittoDir: layout.mosquittoDir,
      serverCredentialsFile: layout.serverCredentialsFile,
      files: {
        spireServerLog: f.spireServerLog,
        serverLog: f.serverLog,
        mosquittoLog: f.mosquittoLog,
        brokerIdentityLog: f.brokerIdentityLog,
        brokerStateFile: f.brokerStateFile,
      },
      brokerContainer: env["K8S4R_MOSQUITTO_CONTAINER"] ?? containerName(layout.root),
    },
    robot: {
      robotId: r.robotId,
      spiffeId: r.spiffeId,
      nodeSpiffeId: r.nodeSpiffeId,
      agentSocket: r.agentSocket,
      agentDataDir: r.agentDataDir,
      joinTokenFile: r.joinTokenFile,
      logFile: r.logFile,
    },
  };
};

/**
 * The dev stack's component table for the doctor (group `stack`): every row with a status,
 * with its doctor hint. None when the project has no dev stack (no `.dev-env/devenv.json`).
 */
export const devStackComponents: StackComponents = (io) => {
  const ctx = resolveContext(new Args([], new Map(), [], []), io);
  if (!existsSync(ctx.stateFile)) return [];
  const view = stackView(ctx);
  return devenvComponents(view).flatMap((c) =>
    c.status
      ? [{
        name: c.name,
        status: () => c.status!(view),
        hint: () =>
          c.hint?.(view) ??
            `see \`k8s4r devenv logs ${c.name}\`; \`k8s4r devenv start\` restarts what is down`,
      }]
      : []
  );
};
