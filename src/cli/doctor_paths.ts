/**
 * The dev stack's paths, as the doctor and `k8s4r robot` see them. The CLI composition is the one place that
 * joins the two: the doctor is production code and never imports devenv; devenv owns its layout.
 */
import { containerName } from "../devenv/broker_argv.ts";
import { defaultLayout, devenvFiles, robotLayout } from "../devenv/layout.ts";
import type { StackPaths } from "../doctor/check.ts";

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
