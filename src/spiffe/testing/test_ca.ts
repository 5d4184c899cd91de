/**
 * `TestCa`: a throwaway certificate authority for tests. It creates EC P-256 keys with
 * node:crypto and builds the certificates itself with a tiny DER writer (`der_writer.ts`),
 * signing the TBSCertificate with `crypto.sign`.
 *
 * Why not `openssl` through a subprocess: node:crypto can sign but has no certificate builder,
 * and a subprocess per certificate would make every unit test slower, depend on a binary and
 * need temp files. Building DER is ~100 lines and keeps tests in-process and deterministic.
 *
 * Certificates look like SPIRE's: CAs carry `URI:spiffe://<td>`, basicConstraints cA,
 * keyCertSign+cRLSign; leaves carry exactly one SPIFFE ID URI SAN, digitalSignature +
 * keyEncipherment, serverAuth + clientAuth EKU, optional DNS SANs and CN (first DNS name by
 * default, as SPIRE does).
 */
import { Buffer } from "node:buffer";
import {
  createHash,
  createPublicKey,
  generateKeyPairSync,
  type KeyObject,
  randomBytes,
  sign,
  X509Certificate,
} from "node:crypto";
import { encodePem } from "../pem.ts";
import {
  bitString,
  bool,
  cat,
  explicit,
  implicit,
  octets,
  oid,
  seq,
  set,
  time,
  uint,
  utf8,
} from "../der_writer.ts";

const ECDSA_SHA256 = seq(oid("1.2.840.10045.4.3.2"));
const EKU_SERVER_AUTH = "1.3.6.1.5.5.7.3.1";
const EKU_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2";

export interface CertParams {
  /** Subject CN. */
  commonName?: string;
  /** Subject O. */
  organization?: string;
  /** URI SANs (SPIFFE IDs or anything, to test bad input). */
  uris?: string[];
  dnsNames?: string[];
  isCa?: boolean;
  /** Key usage bits; default CA: keyCertSign+cRLSign+digitalSignature, leaf: digitalSignature+keyEncipherment. */
  keyUsage?: Array<"digitalSignature" | "keyEncipherment" | "keyCertSign" | "cRLSign">;
  /** Extended key usage; default for leaves serverAuth+clientAuth, none for CAs. */
  extKeyUsage?: Array<"serverAuth" | "clientAuth">;
  notBefore: Date;
  notAfter: Date;
}

const KU_BITS = { digitalSignature: 0, keyEncipherment: 2, keyCertSign: 5, cRLSign: 6 } as const;

function keyUsageExt(names: NonNullable<CertParams["keyUsage"]>): Uint8Array {
  let byte = 0;
  for (const n of names) byte |= 0x80 >> KU_BITS[n];
  let unused = 0;
  while (unused < 8 && byte !== 0 && (byte & (1 << unused)) === 0) unused++;
  return bitString(new Uint8Array([byte]), byte === 0 ? 0 : unused);
}

function ext(id: string, critical: boolean, value: Uint8Array): Uint8Array {
  return critical ? seq(oid(id), bool(true), octets(value)) : seq(oid(id), octets(value));
}

function name(cn?: string, o?: string): Uint8Array {
  const rdns: Uint8Array[] = [];
  if (o) rdns.push(set(seq(oid("2.5.4.10"), utf8(o))));
  if (cn) rdns.push(set(seq(oid("2.5.4.3"), utf8(cn))));
  return seq(...rdns);
}

function keyId(spki: Uint8Array): Uint8Array {
  return new Uint8Array(createHash("sha1").update(spki).digest());
}

/**
 * Builds and signs one certificate. `issuer` undefined means self-signed. `subjectKey` may be a
 * public key when there is an issuer.
 */
export function buildCertificate(
  params: CertParams,
  subjectKey: KeyObject,
  issuer?: { cert: X509Certificate; key: KeyObject; subjectName: Uint8Array; spki: Uint8Array },
): { der: Uint8Array; subjectName: Uint8Array; spki: Uint8Array } {
  const pub = subjectKey.type === "public" ? subjectKey : createPublicKey(subjectKey);
  const spki = new Uint8Array(pub.export({ format: "der", type: "spki" }));
  const subjectName = name(params.commonName, params.organization);
  const isCa = params.isCa ?? false;
  const exts: Uint8Array[] = [
    ext("2.5.29.19", true, isCa ? seq(bool(true)) : seq()),
    ext(
      "2.5.29.15",
      true,
      keyUsageExt(
        params.keyUsage ??
          (isCa ? ["digitalSignature", "keyCertSign", "cRLSign"] : [
            "digitalSignature",
            "keyEncipherment",
          ]),
      ),
    ),
  ];
  const eku = params.extKeyUsage ?? (isCa ? [] : ["serverAuth", "clientAuth"]);
  if (eku.length) {
    exts.push(
      ext(
        "2.5.29.37",
        false,
        seq(...eku.map((e) => oid(e === "serverAuth" ? EKU_SERVER_AUTH : EKU_CLIENT_AUTH))),
      ),
    );
  }
  exts.push(ext("2.5.29.14", false, octets(keyId(spki))));
  exts.push(
    ext("2.5.29.35", false, seq(implicit(0, keyId(issuer ? issuer.spki : spki)))),
  );
  const enc = new TextEncoder();
  const sans = [
    ...(params.dnsNames ?? []).map((d) => implicit(2, enc.encode(d))),
    ...(params.uris ?? []).map((u) => implicit(6, enc.encode(u))),
  ];
  if (sans.length) exts.push(ext("2.5.29.17", false, seq(...sans)));

  const serial = randomBytes(16);
  serial[0] &= 0x7f;
  const tbs = seq(
    explicit(0, uint(new Uint8Array([2]))),
    uint(new Uint8Array(serial)),
    ECDSA_SHA256,
    issuer ? issuer.subjectName : subjectName,
    seq(time(params.notBefore), time(params.notAfter)),
    subjectName,
    spki,
    explicit(3, seq(...exts)),
  );
  const signature = sign("sha256", tbs, {
    key: issuer ? issuer.key : subjectKey,
    dsaEncoding: "der",
  });
  const der = seq(tbs, ECDSA_SHA256, bitString(new Uint8Array(signature)));
  return { der, subjectName, spki };
}

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

  private issuerInfo() {
    return {
      cert: this.certificate,
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
