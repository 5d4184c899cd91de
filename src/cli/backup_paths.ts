/**
 * What a control host's backup holds, for the dev stack's layout: the CLI composition is the
 * one place that joins `k8s4r backup` (production code, src/backup/) and devenv's layout.
 */
import { join } from "node:path";
import type { BackupSource, BackupSources } from "../backup/mod.ts";
import { caFiles } from "../ca/mod.ts";
import { fleetTarget, pendingRestore, spireTarget } from "../devenv/components_ha.ts";
import { devenvComponents, stackMode, stackView } from "../devenv/components.ts";
import { resolveContext } from "../devenv/context.ts";
import type { Io } from "./io.ts";
import { isRecordAlive, readPidFile } from "../process/mod.ts";
import { Args } from "./mod.ts";

export function devStackBackupSources(io: Io, projectDir: string): BackupSources {
  const ctx = resolveContext(new Args([], new Map([["project-dir", projectDir]]), [], []), io);
  const { layout: L } = ctx;
  const mode = stackMode(ctx);
  const ca = caFiles(L.caDir);
  const pendingDump = (db: string) => pendingRestore(L, db);
  const sources: BackupSource[] = [
    mode.ha
      ? {
        kind: "postgres",
        name: "spire-datastore",
        target: spireTarget(L),
        pgpassFile: L.ha.pgpassFile,
        restoreTo: pendingDump(spireTarget(L).database),
        required: true,
      }
      : {
        kind: "sqlite",
        name: "spire-datastore",
        path: join(L.spireServerDataDir, "datastore.sqlite3"),
        required: true,
      },
    // After the datastore (see src/backup/mod.ts).
    {
      kind: "file",
      name: "spire-keys",
      path: join(L.spireServerDataDir, "keys.json"),
      required: true,
    },
    ...(mode.ha
      ? [{
        kind: "file",
        name: "spire-2-keys",
        path: join(L.ha.spireServer2DataDir, "keys.json"),
      }] as const
      : []),
    { kind: "file", name: "root-ca.crt", path: ca.rootCert },
    { kind: "file", name: "root-ca.key", path: ca.rootKey },
    { kind: "file", name: "upstream-ca.crt", path: ca.upstreamCert },
    { kind: "file", name: "upstream-ca.key", path: ca.upstreamKey },
    // The factory CA and the control-host records of `k8s4r robot add` (branch i12-control's
    // layout: .dev-env/factory-ca, control-host.json, robots.json), when there are some.
    { kind: "file", name: "factory-ca.crt", path: join(L.devEnvDir, "factory-ca", "ca.crt") },
    { kind: "file", name: "factory-ca.key", path: join(L.devEnvDir, "factory-ca", "ca.key") },
    { kind: "file", name: "control-host.json", path: join(L.devEnvDir, "control-host.json") },
    { kind: "file", name: "robots.json", path: join(L.devEnvDir, "robots.json") },
    mode.ha
      ? {
        kind: "postgres",
        name: "fleet-registry",
        target: fleetTarget(L),
        pgpassFile: L.ha.pgpassFile,
        restoreTo: pendingDump(fleetTarget(L).database),
      }
      : { kind: "sqlite", name: "fleet-registry", path: join(L.serverDataDir, "registry.sqlite") },
    // Who may do what on the fleet server's API (operators' roles); the operators' own
    // credentials live with each operator (~/.config/k8s4r/operators), not on the host.
    { kind: "file", name: "server-roles.yaml", path: L.serverRolesFile },
    { kind: "file", name: "server-mqtt.json", path: L.serverCredentialsFile, required: true },
    { kind: "file", name: "mosquitto-passwd", path: join(L.mosquittoDir, "passwd") },
  ];
  return {
    root: L.root,
    mode: mode.ha ? "ha" : mode.rootCa ? "root-ca" : "plain",
    startCommand: (m) =>
      `k8s4r devenv start${m === "ha" ? " --ha" : m === "root-ca" ? " --root-ca" : ""}`,
    sources,
    running: () =>
      devenvComponents(stackView(ctx)).filter((c) =>
        c.kind === "daemon" && c.pidFile && isRecordAlive(readPidFile(c.pidFile))
      ).map((c) => c.name),
  };
}
