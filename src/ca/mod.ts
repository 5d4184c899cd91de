/**
 * A stable trust anchor for the fleet: a root CA that k8s4r creates once (`k8s4r ca init`)
 * and an "upstream" CA it signs, which SPIRE's `UpstreamAuthority "disk"` uses to sign SPIRE's
 * own, short-lived, rotating CA:
 *
 *     root CA (10 y, key kept OFFLINE) ── upstream CA (1 y, key on the SPIRE host, 0600)
 *        └── SPIRE's CA (ca_ttl, rotated by SPIRE) ── X.509 SVIDs (robots, broker, agents)
 *
 * The trust bundle that robots, the broker (Mosquitto's `cafile`) and SPIRE agents trust is
 * then the root alone: SPIRE's CA rotations no longer change it, and neither does renewing the
 * upstream CA (`k8s4r ca issue`, the only time the root key is needed). SPIRE's disk plugin
 * re-reads the upstream files at each of its rotations, so a renewed upstream CA is picked up
 * without a restart.
 *
 * Files of a CA directory: `root.crt` (0644), `root.key` (0600; move it offline after init),
 * `upstream.crt` (0644), `upstream.key` (0600). EC P-256 keys, PKCS#8 PEM. The upstream pair
 * is written as one (`writeFilePairAtomic`: both are links into `.upstream.key.pair/current/`),
 * since SPIRE reads the two files separately at any of its rotations.
 */
import { Buffer } from "node:buffer";
import {
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  type KeyObject,
  X509Certificate,
} from "node:crypto";
import { join } from "node:path";
import { CliError } from "../cli/errors.ts";
import { fileMode, writeFileAtomic, writeFilePairAtomic } from "../fs/atomic.ts";
import { buildCertificate, issuerFromCert } from "../spiffe/cert_builder.ts";
import { encodePem } from "../spiffe/pem.ts";
import type { DiskUpstreamAuthority } from "../spire/server.ts";

/** Where `k8s4r ca` keeps the CA, relative to the project directory (the dev stack's too). */
export const DEFAULT_CA_DIR = ".spire-data/ca";
export const DEFAULT_ROOT_DAYS = 3650;
export const DEFAULT_UPSTREAM_DAYS = 365;
const DAY_MS = 86_400_000;

export interface CaFiles {
  dir: string;
  rootCert: string;
  rootKey: string;
  upstreamCert: string;
  upstreamKey: string;
}

export function caFiles(dir: string): CaFiles {
  return {
    dir,
    rootCert: join(dir, "root.crt"),
    rootKey: join(dir, "root.key"),
    upstreamCert: join(dir, "upstream.crt"),
    upstreamKey: join(dir, "upstream.key"),
  };
}

/** What SPIRE's `UpstreamAuthority "disk"` is configured with: the bundle is the root. */
export function upstreamAuthorityOf(f: CaFiles): DiskUpstreamAuthority {
  return { certFile: f.upstreamCert, keyFile: f.upstreamKey, bundleFile: f.rootCert };
}

function exists(path: string): boolean {
  return fileMode(path) !== undefined;
}

function newKey(): KeyObject {
  return generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
}

function keyPem(key: KeyObject): string {
  return key.export({ format: "pem", type: "pkcs8" }).toString();
}

function certPem(der: Uint8Array): string {
  return encodePem("CERTIFICATE", der);
}

async function readCert(path: string): Promise<X509Certificate> {
  try {
    return new X509Certificate(await Deno.readTextFile(path));
  } catch (err) {
    throw new CliError(`${path}: not a readable PEM certificate (${(err as Error).message})`);
  }
}

async function readKey(path: string): Promise<KeyObject> {
  const mode = fileMode(path);
  if (mode === undefined) throw new CliError(`${path}: no such key file`);
  if ((mode & 0o077) !== 0) {
    throw new CliError(
      `${path}: the key is readable by others (mode ${mode.toString(8)})`,
      1,
      `chmod 600 ${path}`,
    );
  }
  try {
    return createPrivateKey(await Deno.readTextFile(path));
  } catch (err) {
    throw new CliError(`${path}: not a PEM private key (${(err as Error).message})`);
  }
}

function sameKey(cert: X509Certificate, key: KeyObject): boolean {
  const a = cert.publicKey.export({ format: "der", type: "spki" });
  const b = createPublicKey(key).export({ format: "der", type: "spki" });
  return Buffer.compare(a, b) === 0;
}

export interface InitOptions {
  trustDomain: string;
  rootDays?: number;
  upstreamDays?: number;
  now?: Date;
}

export interface CaSummary {
  root: X509Certificate;
  upstream: X509Certificate;
}

/** Signs a new upstream CA with the root (cert and key); the key is written 0600. */
async function writeUpstream(
  f: CaFiles,
  root: X509Certificate,
  rootKey: KeyObject,
  o: { trustDomain: string; days: number; now: Date },
): Promise<X509Certificate> {
  const notAfter = new Date(
    Math.min(o.now.getTime() + o.days * DAY_MS, Date.parse(root.validTo)),
  );
  const key = newKey();
  const built = buildCertificate(
    {
      commonName: `k8s4r SPIRE upstream CA (${o.trustDomain})`,
      organization: "k8s4r",
      uris: [`spiffe://${o.trustDomain}`],
      isCa: true,
      notBefore: new Date(o.now.getTime() - 60_000),
      notAfter,
    },
    key,
    issuerFromCert(new Uint8Array(root.raw), rootKey),
  );
  // One pair: SPIRE's disk plugin, reading both at any moment (even after a crash between the
  // two writes), finds a key that matches the certificate.
  await writeFilePairAtomic(
    { path: f.upstreamKey, data: keyPem(key), mode: 0o600 },
    { path: f.upstreamCert, data: certPem(built.der), mode: 0o644 },
  );
  return new X509Certificate(Buffer.from(built.der));
}

/**
 * Creates the root CA and a first upstream CA in `dir` (0700). Refuses to overwrite an
 * existing root: a new root is a new trust anchor that every robot would have to be given.
 */
export async function initCa(dir: string, o: InitOptions): Promise<CaSummary> {
  const f = caFiles(dir);
  for (const p of [f.rootCert, f.rootKey]) {
    if (exists(p)) {
      throw new CliError(
        `${p} exists: this directory already has a root CA`,
        1,
        "a new root changes the trust anchor of every robot; to renew the upstream CA run " +
          "`k8s4r ca issue`",
      );
    }
  }
  const now = o.now ?? new Date();
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  await Deno.chmod(dir, 0o700);
  const rootKey = newKey();
  const built = buildCertificate({
    commonName: `k8s4r root CA (${o.trustDomain})`,
    organization: "k8s4r",
    uris: [`spiffe://${o.trustDomain}`],
    isCa: true,
    notBefore: new Date(now.getTime() - 60_000),
    notAfter: new Date(now.getTime() + (o.rootDays ?? DEFAULT_ROOT_DAYS) * DAY_MS),
  }, rootKey);
  await writeFileAtomic(f.rootKey, keyPem(rootKey), 0o600);
  await writeFileAtomic(f.rootCert, certPem(built.der), 0o644);
  const root = new X509Certificate(Buffer.from(built.der));
  const upstream = await writeUpstream(f, root, rootKey, {
    trustDomain: o.trustDomain,
    days: o.upstreamDays ?? DEFAULT_UPSTREAM_DAYS,
    now,
  });
  return { root, upstream };
}

/**
 * A new upstream CA signed by the root, whose key comes from `rootKeyFile` (the offline copy)
 * or the CA directory. SPIRE takes it at its next CA rotation; the bundle does not change.
 */
export async function issueUpstream(
  dir: string,
  o: { trustDomain: string; rootKeyFile?: string; upstreamDays?: number; now?: Date },
): Promise<X509Certificate> {
  const f = caFiles(dir);
  const root = await readCert(f.rootCert);
  const keyFile = o.rootKeyFile ?? f.rootKey;
  if (!exists(keyFile)) {
    throw new CliError(
      `${keyFile}: no root key here`,
      1,
      "the root key is kept offline: pass its copy with --root-key FILE",
    );
  }
  const rootKey = await readKey(keyFile);
  if (!sameKey(root, rootKey)) {
    throw new CliError(`${keyFile}: this key does not belong to ${f.rootCert}`);
  }
  return await writeUpstream(f, root, rootKey, {
    trustDomain: o.trustDomain,
    days: o.upstreamDays ?? DEFAULT_UPSTREAM_DAYS,
    now: o.now ?? new Date(),
  });
}

export interface CaState {
  files: CaFiles;
  root?: X509Certificate;
  upstream?: X509Certificate;
  /** The root key is on this host (it should be offline). */
  rootKeyOnline: boolean;
  /** What is wrong, one line each; empty = usable by SPIRE. */
  problems: string[];
}

/** Reads and checks a CA directory, as SPIRE's disk plugin will use it. */
export async function readCa(dir: string, now = Date.now()): Promise<CaState> {
  const f = caFiles(dir);
  const st: CaState = { files: f, rootKeyOnline: exists(f.rootKey), problems: [] };
  const load = async (p: string) => exists(p) ? await readCert(p) : undefined;
  st.root = await load(f.rootCert);
  st.upstream = await load(f.upstreamCert);
  if (!st.root) st.problems.push(`${f.rootCert}: missing (run \`k8s4r ca init\`)`);
  if (!st.upstream) st.problems.push(`${f.upstreamCert}: missing (run \`k8s4r ca issue\`)`);
  const keyMode = fileMode(f.upstreamKey);
  if (keyMode === undefined) st.problems.push(`${f.upstreamKey}: missing`);
  else if ((keyMode & 0o077) !== 0) {
    st.problems.push(`${f.upstreamKey}: readable by others (mode ${keyMode.toString(8)})`);
  }
  if (st.rootKeyOnline) {
    const m = fileMode(f.rootKey)!;
    if ((m & 0o077) !== 0) st.problems.push(`${f.rootKey}: readable by others (${m.toString(8)})`);
  }
  if (st.root && st.upstream) {
    if (!st.upstream.checkIssued(st.root) || !st.upstream.verify(st.root.publicKey)) {
      st.problems.push(`${f.upstreamCert}: not signed by ${f.rootCert}`);
    }
    for (const [name, c] of [["root", st.root], ["upstream", st.upstream]] as const) {
      if (Date.parse(c.validTo) <= now) st.problems.push(`the ${name} CA expired ${c.validTo}`);
    }
  }
  if (st.upstream && keyMode !== undefined && (keyMode & 0o077) === 0) {
    try {
      if (!sameKey(st.upstream, await readKey(f.upstreamKey))) {
        st.problems.push(`${f.upstreamKey}: does not belong to ${f.upstreamCert}`);
      }
    } catch (err) {
      st.problems.push((err as Error).message);
    }
  }
  return st;
}
