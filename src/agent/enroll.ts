/**
 * `k8s4r agent --enroll FILE [--data-dir DIR]`, the robot side of enrollment: validate the
 * enrollment file, then write the robot host's files (src/fleet/paths.ts):
 *
 *   agent.yaml       the agent's config, in the plugins.yaml format (`robot.id`, `spire.*`,
 *                    `mqtt.brokerUrl`, `mqtt.brokerSpiffeId`); on re-enrollment the other keys
 *                    (tasks, rotation, heartbeats) and comments of an existing file are kept
 *   enrollment.json  the enrollment less its token (0600): what the doctor reads
 *   trust-bundle.pem the SPIRE bundle spire-agent bootstraps from
 *   join-token       the token (0600), or x509pop/agent.crt next to the robot's own key
 *
 * A new enrollment is a new node identity: the SPIRE agent's old SVID and key (agent-data.json,
 * keys.json) are removed, so spire-agent attests with the new credential. The caller then runs
 * the agent from agent.yaml.
 */
import { X509Certificate } from "node:crypto";
import { dirname } from "node:path";
import { Document, isMap, parseDocument, type Scalar, type YAMLMap } from "yaml";
import { CliError, ConfigError } from "../cli/errors.ts";
import {
  checkEnrollmentUsable,
  type Enrollment,
  enrollmentRecord,
  parseEnrollment,
  readEnrollmentText,
  reenrollHint,
} from "../fleet/enrollment.ts";
import type { RobotHostPaths } from "../fleet/paths.ts";
import { samePublicKey } from "../spiffe/csr.ts";
import { decodePem } from "../spiffe/pem.ts";
import { grpcHealthCheck } from "../spire/health.ts";
import { agentConfigFromText } from "./config.ts";
import { readRobotKey } from "./x509pop.ts";

export interface EnrollOptions {
  file: string;
  paths: RobotHostPaths;
  cwd: string;
  now?: number;
  /** `tasks.user` to write when agent.yaml names none (the caller enrolls as root). */
  taskUser?: string;
}

export interface EnrollResult {
  enrollment: Enrollment;
  paths: RobotHostPaths;
  /** True when an agent.yaml existed and was updated in place. */
  updatedConfig: boolean;
}

/** agent.yaml for `e`: `existing` updated in place (other keys and comments kept), or new. */
export function renderAgentYaml(
  existing: string | undefined,
  e: Enrollment,
  p: RobotHostPaths,
  existingName = p.agentConfig,
  /** Written as `tasks.user` when the file names none (enrolling as root: `k8s4r-task`). */
  taskUser?: string,
): string {
  let doc: Document;
  if (existing !== undefined && existing.trim() !== "") {
    doc = parseDocument(existing);
    if (doc.errors.length > 0 || !isMap(doc.contents)) {
      throw new ConfigError(
        existingName,
        doc.errors[0]?.linePos?.[0]?.line,
        undefined,
        "expected the agent's YAML config to update; fix or remove it, then enroll again",
      );
    }
  } else {
    doc = new Document({});
    doc.commentBefore = ` The k8s4r agent of ${e.robotId}, written by \`k8s4r agent --enroll\`.\n` +
      " Enrolling again rewrites robot.id, spire.*, mqtt.brokerUrl/brokerSpiffeId and\n" +
      " tasks.signerSpiffeId; keep your own settings (tasks, rotation, heartbeats) in the other keys.";
  }
  const set = (path: string[], v: unknown) => doc.setIn(path, v);
  set(["robot", "id"], e.robotId);
  set(["spire", "trustDomain"], e.trustDomain);
  set(["spire", "serverAddr"], e.spireServerAddress);
  set(["spire", "socketPath"], p.socketPath);
  set(["spire", "dataDir"], p.dataDir);
  set(["spire", "trustBundlePath"], p.trustBundle);
  set(["spire", "nodeAttestor"], e.attestation.type);
  doc.deleteIn(["spire", "joinToken"]); // a token never lives in the config
  if (e.attestation.type === "join_token") {
    set(["spire", "joinTokenFile"], p.joinTokenFile);
    doc.deleteIn(["spire", "x509popKeyPath"]);
    doc.deleteIn(["spire", "x509popCertPath"]);
  } else {
    doc.deleteIn(["spire", "joinTokenFile"]);
    set(["spire", "x509popKeyPath"], p.x509popKey);
    set(["spire", "x509popCertPath"], p.x509popCert);
  }
  set(["mqtt", "brokerUrl"], e.brokerUrl);
  set(["mqtt", "brokerSpiffeId"], e.brokerSpiffeId);
  // The only signer whose tasks and cancels this robot acts on.
  set(["tasks", "signerSpiffeId"], e.fleetServerSpiffeId);
  if (!doc.hasIn(["tasks", "allow"])) {
    set(["tasks", "allow"], []);
    const tasks = doc.getIn(["tasks"], true) as { commentBefore?: string } | undefined;
    if (tasks) {
      tasks.commentBefore =
        " Executables the fleet server may run here: exact names or absolute paths. [] runs none." +
        "\n An allowed program takes any argv: allowing tar, find, git, env, awk, sed or a shell" +
        "\n allows everything. Allow fixed scripts.";
    }
  }
  // A root agent runs tasks only as an unprivileged user (it refuses to start otherwise).
  if (taskUser !== undefined && !doc.hasIn(["tasks", "user"])) {
    const pair = doc.createPair("user", taskUser);
    (pair.key as Scalar).commentBefore =
      " Tasks run as this user (created by --enroll), with no capability; never as root.";
    (doc.getIn(["tasks"], true) as YAMLMap).items.push(pair);
  }
  return doc.toString({ lineWidth: 0 });
}

async function writePrivate(path: string, text: string): Promise<void> {
  await Deno.mkdir(dirname(path), { recursive: true, mode: 0o700 });
  await Deno.writeTextFile(path, text, { mode: 0o600 });
  await Deno.chmod(path, 0o600);
}

async function writePublic(path: string, text: string): Promise<void> {
  await Deno.mkdir(dirname(path), { recursive: true, mode: 0o700 });
  await Deno.writeTextFile(path, text, { mode: 0o644 });
  await Deno.chmod(path, 0o644);
}

async function readIfExists(path: string): Promise<string | undefined> {
  try {
    return await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
}

/** Validates `opts.file` and writes the robot host's config and state. Does not start anything. */
export async function enrollRobot(opts: EnrollOptions): Promise<EnrollResult> {
  const { paths: p } = opts;
  const now = opts.now ?? Date.now();
  const text = await readEnrollmentText(opts.file);
  const e = parseEnrollment(text, opts.file);
  checkEnrollmentUsable(e, opts.file, text, now);

  // Never under a running agent: it holds the socket and its SVID.
  if (await grpcHealthCheck(p.socketPath, 1000).then((s) => s === "SERVING", () => false)) {
    throw new CliError(
      `a SPIRE agent is already serving on ${p.socketPath}: enrolling would replace its identity under it`,
      1,
      "stop it first (systemctl stop k8s4r-agent, or Ctrl-C the running k8s4r agent), then enroll again",
    );
  }

  if (e.attestation.type === "x509pop") {
    let key;
    try {
      key = await readRobotKey(p.x509popKey);
    } catch (err) {
      const msg = (err as Error).message;
      throw new CliError(
        `${opts.file}: attestation.certificate: the x509pop certificate needs this robot's key, but: ${msg}`,
        1,
        /^no x509pop key/.test(msg)
          ? `make the key and a CSR here first: k8s4r agent csr --robot-id ${e.robotId}${
            p.configDir === "/etc/k8s4r" ? "" : ` --data-dir ${p.dataDir}`
          } > ${e.robotId}.csr; then ${reenrollHint(e.robotId, "x509pop")}`
          : (err as CliError).hint,
      );
    }
    const leaf = new X509Certificate(decodePem(e.attestation.certificate)[0].der);
    if (!samePublicKey(leaf.publicKey, key)) {
      throw new CliError(
        `${opts.file}: attestation.certificate: the certificate is not for this robot's key ${p.x509popKey} (it was signed for another CSR)`,
        1,
        `send this robot's CSR (k8s4r agent csr --robot-id ${e.robotId}) to the control host: ${
          reenrollHint(e.robotId, "x509pop")
        }`,
      );
    }
  }

  await Deno.mkdir(p.dataDir, { recursive: true, mode: 0o700 });
  await Deno.chmod(p.dataDir, 0o700);
  await Deno.mkdir(p.configDir, { recursive: true, mode: 0o755 });

  // A new enrollment is a new node identity: forget the old one.
  for (const f of ["agent-data.json", "keys.json"]) {
    await Deno.remove(`${p.dataDir}/${f}`).catch(() => {});
  }
  await writePublic(p.trustBundle, e.trustBundle);
  if (e.attestation.type === "join_token") {
    await writePrivate(p.joinTokenFile, e.attestation.token!);
    await Deno.remove(p.x509popCert).catch(() => {});
  } else {
    await writePublic(p.x509popCert, e.attestation.certificate);
    await Deno.remove(p.joinTokenFile).catch(() => {});
  }
  await writePrivate(
    p.enrollmentRecord,
    JSON.stringify(enrollmentRecord(e, new Date(now)), null, 2) + "\n",
  );

  const existing = await readIfExists(p.agentConfig);
  const yaml = renderAgentYaml(existing, e, p, p.agentConfig, opts.taskUser);
  // The agent must read back exactly what was meant: judge it with the agent's own loader.
  const { config } = agentConfigFromText(yaml, {
    cwd: opts.cwd,
    env: {},
    flags: {},
    file: p.agentConfig,
    display: p.agentConfig,
  });
  if (config.robotId !== e.robotId || config.spire.dataDir !== p.dataDir) {
    throw new Error(`agent.yaml does not say what the enrollment says (${p.agentConfig})`);
  }
  await writePrivate(p.agentConfig, yaml);
  return { enrollment: e, paths: p, updatedConfig: existing !== undefined };
}
