/**
 * How the broker process is started, as pure functions of its inputs so the exact argv can be
 * unit-tested (there is no Docker engine on our machines).
 *
 * Docker mode runs `eclipse-mosquitto:2.0` with host networking and bind-mounts the very same
 * files the native broker would use, at the same absolute paths, so one generated mosquitto.conf
 * serves both modes. The `docker run` client stays in the foreground (no `-d`): it is the daemon
 * devenv supervises through its pid file, and `--rm` removes the container when it stops.
 */
import { createHash } from "node:crypto";

export type BrokerMode = "native" | "docker";

export const MOSQUITTO_IMAGE = "eclipse-mosquitto:2.0";

export interface BrokerArgvInput {
  /** Absolute path of the generated mosquitto.conf. */
  configFile: string;
  /** Directories the config refers to (generated files, the exported CA): mounted read-only. */
  readOnlyDirs: string[];
  /** Directories the broker writes (persistence): mounted read-write. */
  writableDirs: string[];
  /** The project root; names the container so two checkouts do not collide. */
  projectRoot: string;
  uid: number;
  gid: number;
  /** Native mosquitto binary. */
  mosquittoPath?: string;
}

export interface BrokerCommand {
  mode: BrokerMode;
  cmd: string;
  args: string[];
  /** Docker mode: the container's name (used for `docker kill --signal HUP` and `docker rm`). */
  container?: string;
}

/** `k8s4r-mosquitto-<8 hex of the project path>`. */
export function containerName(projectRoot: string): string {
  const h = createHash("sha256").update(projectRoot).digest("hex").slice(0, 8);
  return `k8s4r-mosquitto-${h}`;
}

export function nativeBrokerCommand(input: BrokerArgvInput): BrokerCommand {
  return {
    mode: "native",
    cmd: input.mosquittoPath ?? "mosquitto",
    args: ["-c", input.configFile],
  };
}

export function dockerBrokerCommand(input: BrokerArgvInput, docker = "docker"): BrokerCommand {
  const container = containerName(input.projectRoot);
  const mounts: string[] = [];
  const seen = new Set<string>();
  for (const [dirs, mode] of [[input.writableDirs, "rw"], [input.readOnlyDirs, "ro"]] as const) {
    for (const d of dirs) {
      if (seen.has(d)) continue;
      seen.add(d);
      mounts.push("--volume", `${d}:${d}:${mode}`);
    }
  }
  return {
    mode: "docker",
    cmd: docker,
    container,
    args: [
      "run",
      "--rm",
      "--name",
      container,
      "--network",
      "host",
      // Same uid as the files (keys are 0600), so the broker can read them and a SIGHUP reload
      // works after mosquitto has dropped privileges.
      "--user",
      `${input.uid}:${input.gid}`,
      ...mounts,
      MOSQUITTO_IMAGE,
      "mosquitto",
      "-c",
      input.configFile,
    ],
  };
}

/** The argv that makes a running broker reload its certificate (SIGHUP). */
export function dockerSighupArgv(container: string): string[] {
  return ["kill", "--signal", "HUP", container];
}

/** The argv that removes a leftover container (`clean`). */
export function dockerRemoveArgv(container: string): string[] {
  return ["rm", "--force", container];
}
