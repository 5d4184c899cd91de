/**
 * The robot's x509pop key and its certificate signing request (`k8s4r agent csr`).
 *
 * The key is made here and never leaves the robot host: an EC P-256 key in PKCS#8 PEM, 0600,
 * in the data dir (`x509pop/agent.key`). The CSR (subject CN = robot id, the CN rule) goes to the
 * control host, which signs it with the factory CA and puts the certificate into the robot's
 * enrollment file. Running it again prints a CSR for the same key.
 */
import { createPrivateKey, generateKeyPairSync, type KeyObject } from "node:crypto";
import { dirname } from "node:path";
import { CliError } from "../cli/errors.ts";
import type { RobotHostPaths } from "../fleet/paths.ts";
import { createCsr, csrToPem } from "../spiffe/csr.ts";

export interface RobotCsr {
  csrPem: string;
  keyPath: string;
  /** False when an existing key was reused. */
  created: boolean;
}

/** Reads the robot's x509pop key, refusing one that others can read. */
export async function readRobotKey(path: string): Promise<KeyObject> {
  let st: Deno.FileInfo;
  try {
    st = await Deno.stat(path);
  } catch {
    throw new CliError(`no x509pop key at ${path}`, 1);
  }
  if (((st.mode ?? 0) & 0o077) !== 0) {
    throw new CliError(
      `the x509pop key ${path} is readable by others (mode ${
        ((st.mode ?? 0) & 0o777).toString(8)
      }); it must be 0600`,
      1,
      `chmod 600 ${path}`,
    );
  }
  try {
    return createPrivateKey(await Deno.readTextFile(path));
  } catch (err) {
    throw new CliError(`${path}: not a PEM private key: ${(err as Error).message}`, 1);
  }
}

/** Makes the key (once) and returns a CSR for it. */
export async function robotCsr(robotId: string, paths: RobotHostPaths): Promise<RobotCsr> {
  const keyPath = paths.x509popKey;
  let key: KeyObject;
  let created = false;
  try {
    await Deno.stat(keyPath);
    key = await readRobotKey(keyPath);
  } catch (err) {
    if (err instanceof CliError && !/^no x509pop key/.test(err.message)) throw err;
    await Deno.mkdir(paths.dataDir, { recursive: true, mode: 0o700 });
    await Deno.mkdir(dirname(keyPath), { recursive: true, mode: 0o700 });
    key = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
    const pem = key.export({ format: "pem", type: "pkcs8" }).toString();
    // Created 0600 from the first byte (createNew: never over a file someone else made).
    await Deno.writeTextFile(keyPath, pem, { mode: 0o600, createNew: true });
    await Deno.chmod(keyPath, 0o600);
    created = true;
  }
  return { csrPem: csrToPem(createCsr({ commonName: robotId, key })), keyPath, created };
}
