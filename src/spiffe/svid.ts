/**
 * X.509 SVIDs (https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md): a leaf
 * certificate carrying exactly one SPIFFE ID as URI SAN, its intermediates, and the private key.
 */
import { Buffer } from "node:buffer";
import { createPrivateKey, createPublicKey, type KeyObject, X509Certificate } from "node:crypto";
import { concatDer, DerError, splitDer } from "./der.ts";
import { parseSpiffeId, SpiffeId, SpiffeIdError } from "./id.ts";
import { decodePem, encodePem, PemError } from "./pem.ts";
import { certInfo } from "./x509.ts";

/** An X.509 SVID that breaks a rule of the X509-SVID specification, or a broken key. */
export class SvidError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "SvidError";
  }
}

export class X509Svid {
  constructor(
    readonly id: SpiffeId,
    /** Leaf first, then intermediates (never the root). */
    readonly certificates: X509Certificate[],
    readonly privateKey: KeyObject,
    /** Operator-chosen label from the Workload API, "" when none. */
    readonly hint = "",
  ) {}

  get leaf(): X509Certificate {
    return this.certificates[0];
  }

  /** Start of the leaf's validity. */
  get notBefore(): Date {
    return certInfo(this.leaf).notBefore;
  }

  /** End of the leaf's validity. */
  get notAfter(): Date {
    return certInfo(this.leaf).notAfter;
  }

  /** DNS SANs of the leaf (SPIRE puts the entry's `-dns` names there; the first is the CN). */
  get dnsNames(): string[] {
    return certInfo(this.leaf).dnsNames;
  }

  /** Leaf and intermediates as concatenated PEM, for `cert` in node:tls or a file. */
  certChainPem(): string {
    return this.certificates.map((c) => encodePem("CERTIFICATE", new Uint8Array(c.raw))).join("");
  }

  /** Leaf and intermediates as concatenated DER, the Workload API's form. */
  certChainDer(): Uint8Array {
    return concatDer(this.certificates.map((c) => new Uint8Array(c.raw)));
  }

  /** The private key as PKCS#8 PEM. */
  privateKeyPem(): string {
    return this.privateKey.export({ format: "pem", type: "pkcs8" }).toString();
  }

  /** The private key as PKCS#8 DER. */
  privateKeyDer(): Uint8Array {
    return new Uint8Array(this.privateKey.export({ format: "der", type: "pkcs8" }));
  }

  /** Leaf certificate serial number (hex), handy to tell rotated SVIDs apart. */
  get serialNumber(): string {
    return this.leaf.serialNumber;
  }
}

function parseCerts(chain: Uint8Array[], what: string): X509Certificate[] {
  return chain.map((der, i) => {
    try {
      return new X509Certificate(Buffer.from(der));
    } catch (err) {
      throw new SvidError(
        `${what}: certificate ${i + 1} cannot be parsed: ${(err as Error).message}`,
      );
    }
  });
}

/** The single SPIFFE ID in a certificate's URI SANs. Throws SvidError otherwise. */
export function spiffeIdFromCert(cert: X509Certificate, what = "leaf certificate"): SpiffeId {
  let uris: string[];
  try {
    uris = certInfo(cert).uris;
  } catch (err) {
    throw new SvidError(`${what}: cannot read extensions: ${(err as Error).message}`);
  }
  if (uris.length === 0) throw new SvidError(`${what} has no URI SAN (expected a SPIFFE ID)`);
  if (uris.length > 1) {
    throw new SvidError(
      `${what} has ${uris.length} URI SANs (${uris.join(", ")}); an X.509 SVID has exactly one`,
    );
  }
  try {
    return parseSpiffeId(uris[0]);
  } catch (err) {
    if (err instanceof SpiffeIdError) {
      throw new SvidError(`${what}: URI SAN is not a valid SPIFFE ID: ${err.message}`);
    }
    throw err;
  }
}

/** Checks the X509-SVID rules for a leaf certificate; returns its SPIFFE ID. */
export function checkLeaf(leaf: X509Certificate): SpiffeId {
  const id = spiffeIdFromCert(leaf);
  const info = certInfo(leaf);
  if (info.isCa) {
    throw new SvidError(`leaf certificate ${id} must not be a CA (basicConstraints cA is true)`);
  }
  if (info.keyUsage) {
    if (!info.keyUsage.digitalSignature) {
      throw new SvidError(`leaf certificate ${id} must have the digitalSignature key usage`);
    }
    if (info.keyUsage.keyCertSign) {
      throw new SvidError(`leaf certificate ${id} must not have the keyCertSign key usage`);
    }
    if (info.keyUsage.cRLSign) {
      throw new SvidError(`leaf certificate ${id} must not have the cRLSign key usage`);
    }
  }
  return id;
}

function spki(key: KeyObject): string {
  return Buffer.from(key.export({ format: "der", type: "spki" })).toString("hex");
}

/**
 * Parses an X.509 SVID as the Workload API sends it: `derChain` is the DER certificates
 * concatenated, leaf first; `pkcs8Der` is the leaf's private key as PKCS#8 DER.
 */
export function parseX509Svid(derChain: Uint8Array, pkcs8Der: Uint8Array, hint = ""): X509Svid {
  let parts: Uint8Array[];
  try {
    parts = splitDer(derChain, "X.509 SVID certificate chain");
  } catch (err) {
    if (err instanceof DerError) throw new SvidError(err.message);
    throw err;
  }
  let key: KeyObject;
  if (pkcs8Der.length === 0) throw new SvidError("X.509 SVID private key is empty");
  try {
    key = createPrivateKey({ key: Buffer.from(pkcs8Der), format: "der", type: "pkcs8" });
  } catch (err) {
    throw new SvidError(
      `X.509 SVID private key is not a valid PKCS#8 DER key: ${(err as Error).message}`,
    );
  }
  return buildSvid(parseCerts(parts, "X.509 SVID certificate chain"), key, hint);
}

/** Parses an X.509 SVID from PEM: the certificate chain (leaf first) and a private key. */
export function parseX509SvidPem(certChainPem: string, keyPem: string, hint = ""): X509Svid {
  let certs: X509Certificate[];
  let key: KeyObject;
  try {
    const blocks = decodePem(certChainPem, "X.509 SVID certificate PEM");
    blocks.forEach((b, i) => {
      if (b.type !== "CERTIFICATE") {
        throw new SvidError(
          `X.509 SVID certificate PEM: block ${i + 1} is ${b.type}, expected CERTIFICATE`,
        );
      }
    });
    certs = parseCerts(blocks.map((b) => b.der), "X.509 SVID certificate PEM");
    const keyBlocks = decodePem(keyPem, "X.509 SVID key PEM");
    if (keyBlocks.length !== 1) {
      throw new SvidError(`X.509 SVID key PEM: expected 1 key, found ${keyBlocks.length} blocks`);
    }
    key = createPrivateKey(keyPem);
  } catch (err) {
    if (err instanceof PemError || err instanceof SvidError) throw new SvidError(err.message);
    throw new SvidError(`X.509 SVID key PEM is not a valid private key: ${(err as Error).message}`);
  }
  return buildSvid(certs, key, hint);
}

function buildSvid(certs: X509Certificate[], key: KeyObject, hint: string): X509Svid {
  const id = checkLeaf(certs[0]);
  certs.slice(1).forEach((c, i) => {
    let ca: boolean;
    try {
      ca = certInfo(c).isCa;
    } catch (err) {
      throw new SvidError(`certificate ${i + 2} of ${id}: ${(err as Error).message}`);
    }
    if (!ca) {
      throw new SvidError(
        `certificate ${i + 2} of the chain of ${id} is not a CA, so it cannot sign the leaf`,
      );
    }
  });
  if (key.type !== "private") throw new SvidError("X.509 SVID key is not a private key");
  if (spki(createPublicKey(key)) !== spki(certs[0].publicKey)) {
    throw new SvidError(
      `X.509 SVID private key does not match the public key of the leaf certificate ${id}`,
    );
  }
  return new X509Svid(id, certs, key, hint);
}
