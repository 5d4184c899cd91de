/**
 * `TestCa`: a throwaway certificate authority for tests. It creates EC P-256 keys with
 * node:crypto and builds the certificates itself with a tiny DER writer (`der_writer.ts`),
 * signing the TBSCertificate with `crypto.sign`.
 *
 * Why not `openssl` through a subprocess: node:crypto can sign but has no certificate builder,
 * and a subprocess per certificate would make every unit test slower, depend on a binary and
 * need temp files. Building DER is ~100 lines (`../cert_builder.ts`, shared with `k8s4r ca` and
 * the factory CA) and keeps tests in-process and deterministic.
 *
 * Certificates look like SPIRE's: CAs carry `URI:spiffe://<td>`, basicConstraints cA,
 * keyCertSign+cRLSign; leaves carry exactly one SPIFFE ID URI SAN, digitalSignature +
 * keyEncipherment, serverAuth + clientAuth EKU, optional DNS SANs and CN (first DNS name by
 * default, as SPIRE does).
 */
import { Buffer } from "node:buffer";
import { generateKeyPairSync, type KeyObject, X509Certificate } from "node:crypto";
import { encodePem } from "../pem.ts";
import { cat } from "../der_writer.ts";
import { buildCertificate, type CertIssuer, type CertParams } from "../cert_builder.ts";

export { buildCertificate, type CertParams };

function newKey(): { privateKey: KeyObject; publicKey: KeyObject } {
  return generateKeyPairSync("ec", { namedCurve: "P-256" });
}

/** A certificate and key issued by a TestCa, in every form tests need. */
export interface IssuedCert {
  spiffeId?: string;
  certificate: X509Certificate;
  /** Leaf then intermediates (never the root). */
  certificates: X509Certificate[];
  /** Leaf then intermediates, concatenated DER (the Workload API's `x509_svid`). */
  chainDer: Uint8Array;
  chainPem: string;
  /** Leaf only. */
  certPem: string;
  key: KeyObject;
  /** PKCS#8 DER (the Workload API's `x509_svid_key`). */
  keyDer: Uint8Array;
  keyPem: string;
  /** The root CA of the issuing TestCa, DER and PEM (the Workload API's `bundle`). */
  bundleDer: Uint8Array;
  bundlePem: string;
}

export interface IssueOptions {
  /** SPIFFE ID for the URI SAN; omit (and maybe set `uris`) to build bad SVIDs. */
  spiffeId?: string;
  /** Extra or replacement URI SANs: when set, used instead of `[spiffeId]`. */
  uris?: string[];
  dnsNames?: string[];
  /** Default: the first DNS name, as SPIRE does. */
  commonName?: string;
  organization?: string;
  /** Lifetime from now (default 3600 s) unless notBefore/notAfter are given. */
  ttlSeconds?: number;
  notBefore?: Date;
  notAfter?: Date;
  /** Make the "leaf" a CA, to test that it is refused. */
  isCa?: boolean;
  keyUsage?: CertParams["keyUsage"];
  extKeyUsage?: CertParams["extKeyUsage"];
  /** Use this key instead of a fresh one. */
  key?: KeyObject;
}

export interface TestCaOptions {
  trustDomain?: string;
  commonName?: string;
  notBefore?: Date;
  notAfter?: Date;
  /** Lifetime from now (default 24 h) unless notBefore/notAfter are given. */
  ttlSeconds?: number;
}

export class TestCa {
  private constructor(
    readonly trustDomain: string,
    readonly certificate: X509Certificate,
    readonly key: KeyObject,
    /** This CA's own certificate plus its parents' up to, not including, the root. */
    readonly chainToRoot: X509Certificate[],
    readonly root: X509Certificate,
    private readonly subjectName: Uint8Array,
    private readonly spki: Uint8Array,
  ) {}

  /** A self-signed root CA for `trustDomain` (default `example.org`). */
  static create(opts: TestCaOptions = {}): TestCa {
    const td = opts.trustDomain ?? "example.org";
    const now = Date.now();
    const { privateKey } = newKey();
    const built = buildCertificate({
      commonName: opts.commonName ?? `${td} test root CA`,
      organization: "SPIFFE",
      uris: [`spiffe://${td}`],
      isCa: true,
      notBefore: opts.notBefore ?? new Date(now - 60_000),
      notAfter: opts.notAfter ?? new Date(now + (opts.ttlSeconds ?? 86_400) * 1000),
    }, privateKey);
    const cert = new X509Certificate(Buffer.from(built.der));
    return new TestCa(td, cert, privateKey, [], cert, built.subjectName, built.spki);
  }

  /** An intermediate CA signed by this CA, in the same trust domain. */
  intermediate(opts: Omit<TestCaOptions, "trustDomain"> = {}): TestCa {
    const now = Date.now();
    const { privateKey } = newKey();
    const built = buildCertificate(
      {
        commonName: opts.commonName ?? `${this.trustDomain} test intermediate CA`,
        organization: "SPIFFE",
        uris: [`spiffe://${this.trustDomain}`],
        isCa: true,
        notBefore: opts.notBefore ?? new Date(now - 60_000),
        notAfter: opts.notAfter ?? new Date(now + (opts.ttlSeconds ?? 43_200) * 1000),
      },
      privateKey,
      this.issuerInfo(),
    );
    const cert = new X509Certificate(Buffer.from(built.der));
    return new TestCa(
      this.trustDomain,
      cert,
      privateKey,
      [cert, ...this.chainToRoot],
      this.root,
      built.subjectName,
      built.spki,
    );
  }

  private issuerInfo(): CertIssuer {
    return {
      key: this.key,
      subjectName: this.subjectName,
      spki: this.spki,
    };
  }

  get rootDer(): Uint8Array {
    return new Uint8Array(this.root.raw);
  }

  get rootPem(): string {
    return encodePem("CERTIFICATE", this.rootDer);
  }

  /** Issues a leaf certificate (an X.509 SVID when `spiffeId` is set). */
  issue(opts: IssueOptions = {}): IssuedCert {
    const now = Date.now();
    const key = opts.key ?? newKey().privateKey;
    const uris = opts.uris ?? (opts.spiffeId !== undefined ? [opts.spiffeId] : []);
    const built = buildCertificate(
      {
        commonName: opts.commonName ?? opts.dnsNames?.[0],
        organization: opts.organization,
        uris,
        dnsNames: opts.dnsNames,
        isCa: opts.isCa,
        keyUsage: opts.keyUsage,
        extKeyUsage: opts.extKeyUsage,
        notBefore: opts.notBefore ?? new Date(now - 10_000),
        notAfter: opts.notAfter ?? new Date(now + (opts.ttlSeconds ?? 3600) * 1000),
      },
      key,
      this.issuerInfo(),
    );
    const leaf = new X509Certificate(Buffer.from(built.der));
    const certificates = [leaf, ...this.chainToRoot];
    const ders = certificates.map((c) => new Uint8Array(c.raw));
    return {
      spiffeId: opts.spiffeId,
      certificate: leaf,
      certificates,
      chainDer: cat(...ders),
      chainPem: ders.map((d) => encodePem("CERTIFICATE", d)).join(""),
      certPem: encodePem("CERTIFICATE", ders[0]),
      key,
      keyDer: new Uint8Array(key.export({ format: "der", type: "pkcs8" })),
      keyPem: key.export({ format: "pem", type: "pkcs8" }).toString(),
      bundleDer: this.rootDer,
      bundlePem: this.rootPem,
    };
  }

  /**
   * A certificate for a key this CA never sees (a CSR's public key), as a factory CA signs a
   * node's x509pop certificate. The result has no private key.
   */
  issueForPublicKey(
    publicKey: KeyObject,
    opts: Omit<IssueOptions, "key" | "isCa"> = {},
  ): { certificate: X509Certificate; chainPem: string; certPem: string } {
    const now = Date.now();
    const built = buildCertificate(
      {
        commonName: opts.commonName ?? opts.dnsNames?.[0],
        organization: opts.organization,
        uris: opts.uris ?? (opts.spiffeId !== undefined ? [opts.spiffeId] : []),
        dnsNames: opts.dnsNames,
        keyUsage: opts.keyUsage,
        extKeyUsage: opts.extKeyUsage,
        notBefore: opts.notBefore ?? new Date(now - 10_000),
        notAfter: opts.notAfter ?? new Date(now + (opts.ttlSeconds ?? 3600) * 1000),
      },
      publicKey,
      this.issuerInfo(),
    );
    const leaf = new X509Certificate(Buffer.from(built.der));
    const ders = [leaf, ...this.chainToRoot].map((c) => new Uint8Array(c.raw));
    return {
      certificate: leaf,
      chainPem: ders.map((d) => encodePem("CERTIFICATE", d)).join(""),
      certPem: encodePem("CERTIFICATE", ders[0]),
    };
  }

  /** An SVID that expired `agoSeconds` ago (default 60). */
  issueExpired(opts: IssueOptions & { agoSeconds?: number } = {}): IssuedCert {
    const now = Date.now();
    const ago = (opts.agoSeconds ?? 60) * 1000;
    return this.issue({
      ...opts,
      notBefore: new Date(now - ago - 3_600_000),
      notAfter: new Date(now - ago),
    });
  }
}

export interface MutualIssuersOptions {
  /** The leaf's SPIFFE ID. */
  spiffeId: string;
  /** How many CA certificates follow the leaf (default 7). */
  count?: number;
  /**
   * true (default): every CA certificate has the same key, so each one's signature verifies
   * under every other's key. false: each has its own key and is signed by the next one's (a
   * cycle), so only one candidate issuer per certificate verifies, and every other must be
   * tried and fail.
   */
  sharedKey?: boolean;
  /**
   * The one subject (CN, O "SPIFFE") and key identifier; default "mutual issuer" and a fixed id.
   * Give a bundle root's to make a verifier also try the root's key on every certificate.
   */
  commonName?: string;
  keyId?: Uint8Array;
}

/**
 * A hostile chain for tests of path building's cost: a leaf and `count` CA certificates with
 * one subject and one key identifier, so that each names every other (and the leaf names each)
 * as its issuer. No bundle anchors it. A verifier that tries every ordering of the
 * intermediates makes `count!`-many signature checks before it gives up.
 */
export function mutuallyIssuingChain(
  opts: MutualIssuersOptions,
): Pick<IssuedCert, "certificate" | "certificates" | "chainPem" | "key" | "keyPem"> {
  const count = opts.count ?? 7;
  const commonName = opts.commonName ?? "mutual issuer";
  const keyId = opts.keyId ?? KEY_ID;
  const now = Date.now();
  const shared = newKey().privateKey;
  const keys = Array.from(
    { length: count },
    () => opts.sharedKey === false ? newKey().privateKey : shared,
  );
  const ca = (i: number) =>
    buildCertificate(
      {
        commonName,
        organization: "SPIFFE",
        isCa: true,
        notBefore: new Date(now - 60_000),
        notAfter: new Date(now + 3_600_000),
        subjectKeyId: keyId,
        authorityKeyId: keyId,
      },
      keys[i],
      issuerOf(keys[(i + 1) % count]),
    );
  const issuerOf = (key: KeyObject): CertIssuer => {
    const self = buildCertificate({
      commonName,
      organization: "SPIFFE",
      notBefore: new Date(now),
      notAfter: new Date(now + 1000),
    }, key);
    return { key, subjectName: self.subjectName, spki: self.spki };
  };
  const leafKey = newKey().privateKey;
  const leaf = buildCertificate(
    {
      uris: [opts.spiffeId],
      notBefore: new Date(now - 10_000),
      notAfter: new Date(now + 3_600_000),
      authorityKeyId: keyId,
    },
    leafKey,
    issuerOf(keys[0]),
  );
  const ders = [leaf.der, ...keys.map((_, i) => ca(i).der)];
  const certificates = ders.map((d) => new X509Certificate(Buffer.from(d)));
  return {
    certificate: certificates[0],
    certificates,
    chainPem: ders.map((d) => encodePem("CERTIFICATE", d)).join(""),
    key: leafKey,
    keyPem: leafKey.export({ format: "pem", type: "pkcs8" }).toString(),
  };
}

const KEY_ID = new Uint8Array(20).fill(0x4b);

/**
 * Counts the signature checks (X509Certificate.prototype.verify) made anywhere in this process
 * until `stop()`: what path building spends its time on. A count, not a time: the bound is
 * exact. One watcher at a time.
 */
export function watchSignatureChecks(): { readonly checks: number; stop(): void } {
  const original = X509Certificate.prototype.verify;
  let checks = 0;
  X509Certificate.prototype.verify = function (this: X509Certificate, key) {
    checks++;
    return original.call(this, key);
  };
  return {
    get checks() {
      return checks;
    },
    stop() {
      X509Certificate.prototype.verify = original;
    },
  };
}

/** Runs `fn` and counts the signature checks it makes (`watchSignatureChecks`). */
export function countSignatureChecks<T>(
  fn: () => T,
): { checks: number; result?: T; error?: unknown } {
  const watch = watchSignatureChecks();
  try {
    const result = fn();
    return { checks: watch.checks, result };
  } catch (error) {
    return { checks: watch.checks, error };
  } finally {
    watch.stop();
  }
}
