/**
 * What a control host's backup holds, for the dev stack's layout: the CLI composition is the
 * one place that joins `k8s4r backup` (production code, src/backup/) and devenv's layout.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { BackupSource, BackupSources } from "../backup/mod.ts";
import { caFiles } from "../ca/mod.ts";
import { parseControlConfig } from "../control/config.ts";
import { factoryCaFiles } from "../control/factory_ca.ts";
import { parseBrokerUrl } from "../fleet/addresses.ts";
import { brokerFiles } from "../mqtt/broker_config.ts";
import { fleetTarget, pendingRestore, spireTarget } from "../devenv/components_ha.ts";
import { devenvComponents, stackMode, stackView } from "../devenv/components.ts";
import { resolveContext } from "../devenv/context.ts";
import type { Io } from "./io.ts";
import { isRecordAlive, readPidFile } from "../process/mod.ts";
import { Args } from "./mod.ts";
import { CliError } from "./errors.ts";

/** The modes a dev-layout control host runs in (the manifest's `mode`). */
const BACKUP_MODES = ["plain", "root-ca", "ha"];

export function devStackBackupSources(io: Io, projectDir: string): BackupSources {
  const ctx = resolveContext(new Args([], new Map([["project-dir", projectDir]]), [], []), io);
  const { layout: L } = ctx;
  const mode = stackMode(ctx);
  const ca = caFiles(L.caDir);
  const factory = factoryCaFiles(L.factoryCaDir);
  const broker = brokerFiles(L.mosquittoDir);
  const pendingDump = (db: string) => pendingRestore(L, db);
  const sourcesOf = (ha: boolean): BackupSource[] => [
    ha
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
    ...(ha
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
    // The factory CA (`--attestation x509pop`) and the control-host config and records of
    // `k8s4r robot add|remove`, when there are some.
    { kind: "file", name: "factory-ca.crt", path: factory.cert },
    { kind: "file", name: "factory-ca.key", path: factory.key },
    { kind: "file", name: "control-host.json", path: L.controlHostConfig },
    { kind: "file", name: "robots.json", path: L.robotRecords },
    ha
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
    { kind: "file", name: "mosquitto-passwd", path: broker.passwordFile },
    // The broker's deny list of removed robots (`robot remove`: a removed robot whose SVID is
    // still valid stays cut off after a restore) and its admin login, which edits that list.
    { kind: "file", name: "mosquitto-dynsec.json", path: broker.dynsecFile },
    { kind: "file", name: "broker-admin.json", path: L.brokerAdminCredentialsFile },
  ];
  return {
    root: L.root,
    mode: mode.ha ? "ha" : mode.rootCa ? "root-ca" : "plain",
    sources: sourcesOf(mode.ha),
    sourcesOf: (m) => {
      if (!BACKUP_MODES.includes(m)) {
        throw new CliError(
          `the backup is of a "${m}" control host; expected one of ${BACKUP_MODES.join(", ")}`,
        );
      }
      return sourcesOf(m === "ha");
    },
    startCommand: (m) =>
      `k8s4r devenv start${m === "ha" ? " --ha" : m === "root-ca" ? " --root-ca" : ""}${
        restoredControlFlags(L.controlHostConfig, factory.cert)
      }`,
    running: () =>
      devenvComponents(stackView(ctx)).filter((c) =>
        c.kind === "daemon" && c.pidFile && isRecordAlive(readPidFile(c.pidFile))
      ).map((c) => c.name),
  };
}

/**
 * The start flags a restored control host needs beyond its mode, read from what was restored:
 * `--attestation x509pop` when there is a factory CA (else SPIRE runs without the x509pop
 * attestor and the control-host config loses it), and `--advertise` with the address robots on
 * other hosts were given (their enrollment files name it).
 */
function restoredControlFlags(controlHostConfig: string, factoryCaCert: string): string {
  let flags = existsSync(factoryCaCert) ? " --attestation x509pop" : "";
  try {
    const c = parseControlConfig(Deno.readTextFileSync(controlHostConfig), controlHostConfig);
    const host = parseBrokerUrl(c.broker.url).host;
    if (!["localhost", "127.0.0.1", "::1"].includes(host)) flags += ` --advertise ${host}`;
  } catch { /* no config restored, or not ours: nothing to add */ }
  return flags;
}
