/**
 * What `k8s4r robot add` issued and `robot remove` removed, kept on the control host because
 * SPIRE cannot say it: SPIRE has no way to list join tokens (nor when one expires), and an
 * x509pop certificate is signed here, not by SPIRE. No secret is kept: a token's expiry, never
 * the token.
 *
 *   { "robots": { "robot-007": { "attestation": "join_token", "addedAt": "...",
 *                                "expiresAt": "...", "removedAt": "...",
 *                                "svidsValidUntil": "..." } } }
 */
import { CliError, errorMessage } from "../cli/errors.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
import { withFileLock } from "../fs/lock.ts";
import type { AttestationType } from "../fleet/enrollment.ts";

export interface RobotRecord {
  /** How `robot add` enrolled it; absent for a robot it never added (removed only). */
  attestation?: AttestationType;
  addedAt?: string;
  /** The join token's expiry, or the x509pop certificate's notAfter. */
  expiresAt?: string;
  /** x509pop: the certificate's serial (lowercase hex), as in the node alias's selector. */
  certSerial?: string;
  /** Set by `robot remove`; cleared by the next `robot add`. */
  removedAt?: string;
  /**
   * Set by `robot remove`: until when an SVID the robot got before its removal can still be
   * valid (removal + the longest X.509 SVID lifetime + a margin). The broker tells those from a
   * new SVID by nothing but the CN, so `robot add` keeps the robot cut off until then.
   */
  svidsValidUntil?: string;
}

export type Records = Record<string, RobotRecord>;

export async function readRecords(file: string): Promise<Records> {
  let text: string;
  try {
    text = await Deno.readTextFile(file);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return {};
    throw new CliError(`${file}: cannot read robot records: ${errorMessage(err)}`);
  }
  try {
    const doc = JSON.parse(text);
    if (!doc || typeof doc.robots !== "object" || Array.isArray(doc.robots)) {
      throw new Error('expected {"robots": {...}}');
    }
    return doc.robots as Records;
  } catch (err) {
    throw new CliError(`${file}: robot records: ${errorMessage(err)}`, 2);
  }
}

/** Read-modify-write under an exclusive lock (concurrent `robot add`s); written atomically. */
export async function updateRecords(file: string, fn: (r: Records) => void): Promise<void> {
  await withFileLock(file, async () => {
    const records = await readRecords(file);
    fn(records);
    await writeFileAtomic(file, JSON.stringify({ robots: records }, null, 2) + "\n", 0o600);
  });
}
