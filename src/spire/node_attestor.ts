/**
 * The spire-agent's NodeAttestor block: how a node proves who it is to the SPIRE server.
 *
 * - `join_token`: a single-use, short-lived secret handed over once (`-joinTokenFile`). After
 *   the first attestation the agent lives on its agent SVID; when that expires (the robot was off
 *   longer than its lifetime) the used token cannot bring it back.
 * - `x509pop` (SPIRE's built-in "proof of possession"): a certificate from a factory CA and the
 *   private key that only this node holds. The server checks the chain against the factory CA
 *   bundle and has the agent sign a challenge; the agent can do so again whenever its SVID
 *   expires. The key is a PEM file here; a TPM-held key needs SPIRE's `tpm_devid` attestor.
 */

export type NodeAttestorConfig =
  | { type: "join_token" }
  | {
    type: "x509pop";
    /** PEM private key (PKCS#8 or PKCS#1), 0600, made on the node. */
    privateKeyPath: string;
    /** PEM chain, leaf first, issued by the factory CA. */
    certificatePath: string;
  };

import { createHash } from "node:crypto";

const q = (s: string) => JSON.stringify(s);

/** The `NodeAttestor "..." {...}` block, indented for the `plugins` section. */
export function renderNodeAttestor(a: NodeAttestorConfig = { type: "join_token" }): string {
  if (a.type === "x509pop") {
    return `  NodeAttestor "x509pop" {
    plugin_data {
      private_key_path = ${q(a.privateKeyPath)}
      certificate_path = ${q(a.certificatePath)}
    }
  }`;
  }
  return `  NodeAttestor "join_token" {
    plugin_data {}
  }`;
}

/**
 * The value of SPIRE's `x509pop:serialnumber:` selector for a certificate serial: lowercase
 * hex padded to an even number of digits (SPIRE's `x509pop.SerialNumberHex`), so a serial whose
 * first byte is below 0x10 reads `0a…`, not `a…`. A node alias must say it the same way: one
 * digit short and it matches no agent.
 */
export function x509popSerialHex(serial: bigint): string {
  if (serial < 0n) throw new RangeError(`a certificate serial is positive, got ${serial}`);
  const hex = serial.toString(16);
  return hex.length % 2 ? `0${hex}` : hex;
}

/**
 * The value of SPIRE's `x509pop:ca:fingerprint:` selector for a CA certificate of the verified
 * chain (every certificate but the leaf, the bundle's root included): the lowercase hex SHA-1 of
 * its DER (SPIRE's `x509pop.Fingerprint`).
 */
export function x509popCaFingerprint(der: Uint8Array): string {
  return createHash("sha1").update(der).digest("hex");
}

/**
 * The selectors of a robot's x509pop node alias: its certificate's CN and serial, and the
 * factory CA it was issued under. The CA's fingerprint keeps a certificate from any other CA
 * of the x509pop bundle (an old factory CA, another vendor's) with the same CN and serial from
 * getting the alias: the serial is not secret (`robot add` prints it).
 */
export function x509popAliasSelectors(
  a: { commonName: string; serialHex: string; caFingerprint: string },
): string[] {
  return [
    `x509pop:subject:cn:${a.commonName}`,
    `x509pop:ca:fingerprint:${a.caFingerprint}`,
    `x509pop:serialnumber:${a.serialHex}`,
  ];
}
