/**
 * Operator credentials on disk: one 0700 directory per operator under
 * `${XDG_CONFIG_HOME:-~/.config}/k8s4r/operators/<name>/`, every file 0600:
 *
 *   cert.pem       the operator's X.509 SVID (spiffe://<td>/operator/<name>), leaf first
 *   key.pem        its private key (PKCS#8), written by `spire-server x509 mint`, never on argv
 *   bundle.pem     the SPIRE trust bundle: what the fleet server's certificate chains to
 *   operator.json  {name, spiffeId, serverUrl, role, issuedAt, expiresAt}
 *
 * `curl --cert cert.pem --key key.pem --cacert bundle.pem <serverUrl>/api/robots` works with
 * these files as they are.
 */
import { join } from "node:path";
import { X509Certificate } from "node:crypto";
import { CliError, errorMessage } from "../cli/errors.ts";
import { isOperatorName, operatorsDir } from "../fleet/mod.ts";
import { parseX509SvidPem, type X509Svid } from "../spiffe/svid.ts";
import { X509Bundle, X509BundleSet } from "../spiffe/bundle.ts";

export const CERT_FILE = "cert.pem";
export const KEY_FILE = "key.pem";
export const BUNDLE_FILE = "bundle.pem";
export const META_FILE = "operator.json";

export interface OperatorMeta {
  name: string;
  spiffeId: string;
  serverUrl: string;
  /** The role recorded on the control host when the credentials were made (informative). */
  role?: string;
  issuedAt: string;
  expiresAt: string;
}

export interface CredentialPaths {
  dir: string;
  cert: string;
  key: string;
  bundle: string;
  meta: string;
}

export function credentialPaths(env: Record<string, string | undefined>, name: string) {
  const dir = join(operatorsDir(env), name);
  return {
    dir,
    cert: join(dir, CERT_FILE),
    key: join(dir, KEY_FILE),
    bundle: join(dir, BUNDLE_FILE),
    meta: join(dir, META_FILE),
  };
}

/** Names of the operators with a credential directory here, sorted. */
export async function listCredentialNames(env: Record<string, string | undefined>) {
  const names: string[] = [];
  try {
    for await (const e of Deno.readDir(operatorsDir(env))) {
      if (e.isDirectory && isOperatorName(e.name)) names.push(e.name);
    }
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  return names.sort();
}

/** The hint every "no credentials" error carries. */
export function addHint(name = "admin"): string {
  return `on the control host, run: k8s4r operator add ${name} --role operator (the dev stack's 'devenv start' creates admin)`;
}

/**
 * Which operator the CLI acts as: `--operator`, else K8S4R_OPERATOR, else `admin` when present,
 * else the only one present. Errors say which command to run.
 */
export async function resolveOperatorName(
  env: Record<string, string | undefined>,
  explicit?: string,
): Promise<string> {
  const want = explicit ?? env["K8S4R_OPERATOR"];
  const names = await listCredentialNames(env);
  if (want !== undefined && want !== "") {
    if (!isOperatorName(want)) {
      throw new CliError(
        `invalid operator name '${want}' (expected [a-z0-9][a-z0-9._-]{0,62})`,
        2,
      );
    }
    if (!names.includes(want)) {
      throw new CliError(
        `no credentials for operator ${want} in ${operatorsDir(env)}`,
        1,
        addHint(want),
      );
    }
    return want;
  }
  if (names.includes("admin")) return "admin";
  if (names.length === 1) return names[0];
  if (names.length === 0) {
    throw new CliError(`no operator credentials in ${operatorsDir(env)}`, 1, addHint());
  }
  throw new CliError(
    `several operators have credentials here (${names.join(", ")}) and none is admin`,
    2,
    "choose one with --operator NAME or K8S4R_OPERATOR=NAME",
  );
}

export interface LoadedCredentials {
  name: string;
  paths: CredentialPaths;
  meta: OperatorMeta;
  svid: X509Svid;
  bundles: X509BundleSet;
  /** Expired, or not valid yet: `operator login` renews. */
  expired: boolean;
}

async function checkPrivate(path: string): Promise<void> {
  const st = await Deno.stat(path);
  if (st.mode !== null && (st.mode & 0o077) !== 0) {
    throw new CliError(
      `${path}: operator credentials must be private (mode ${
        (st.mode & 0o777).toString(8)
      }, expected ${st.isDirectory ? "700" : "600"})`,
      1,
      `chmod ${st.isDirectory ? "700" : "600"} ${path}`,
    );
  }
}

/** Reads and checks an operator's credentials. Throws CliError with a hint when unusable. */
export async function loadCredentials(
  env: Record<string, string | undefined>,
  name: string,
  now = new Date(),
): Promise<LoadedCredentials> {
  const paths = credentialPaths(env, name);
  let meta: OperatorMeta;
  let certPem: string, keyPem: string, bundlePem: string;
  try {
    await checkPrivate(paths.dir);
    for (const f of [paths.cert, paths.key, paths.bundle, paths.meta]) await checkPrivate(f);
    meta = JSON.parse(await Deno.readTextFile(paths.meta));
    certPem = await Deno.readTextFile(paths.cert);
    keyPem = await Deno.readTextFile(paths.key);
    bundlePem = await Deno.readTextFile(paths.bundle);
  } catch (err) {
    if (err instanceof CliError) throw err;
    if (err instanceof Deno.errors.NotFound) {
      throw new CliError(
        `operator ${name}: incomplete credentials in ${paths.dir}: ${errorMessage(err)}`,
        1,
        `renew them: k8s4r operator login ${name}`,
      );
    }
    throw new CliError(`operator ${name}: cannot read ${paths.dir}: ${errorMessage(err)}`);
  }
  if (typeof meta?.serverUrl !== "string" || typeof meta?.spiffeId !== "string") {
    throw new CliError(
      `${paths.meta}: expected {"name", "spiffeId", "serverUrl", ...}`,
      1,
      `renew them: k8s4r operator login ${name}`,
    );
  }
  let svid: X509Svid;
  let bundles: X509BundleSet;
  try {
    svid = parseX509SvidPem(certPem, keyPem);
    bundles = new X509BundleSet([X509Bundle.fromPem(svid.id.trustDomain, bundlePem)]);
  } catch (err) {
    throw new CliError(
      `operator ${name}: unusable credentials in ${paths.dir}: ${errorMessage(err)}`,
      1,
      `renew them: k8s4r operator login ${name}`,
    );
  }
  const expired = now < svid.notBefore || now > svid.notAfter;
  return { name, paths, meta, svid, bundles, expired };
}

/** A certificate's validity, read from a PEM file. */
export function certValidity(pem: string): { notBefore: Date; notAfter: Date } {
  const c = new X509Certificate(pem);
  return { notBefore: new Date(c.validFrom), notAfter: new Date(c.validTo) };
}

/**
 * A fetch client that presents the operator's certificate and trusts its bundle (for scripts
 * and probes using fetch; fetch checks the server's DNS name, so use https://localhost:PORT).
 * Close it when done.
 */
export function fetchClient(creds: LoadedCredentials): Deno.HttpClient {
  return Deno.createHttpClient({
    cert: creds.svid.certChainPem(),
    key: creds.svid.privateKeyPem(),
    caCerts: creds.bundles.bundles().map((b) => b.toPem()),
  });
}
