/**
 * The control host's config: what `k8s4r robot add|list|remove` needs to enroll, list and cut
 * off robots. One JSON document; `devenv start` writes one for the dev stack
 * (`.dev-env/control-host.json`), a non-dev install writes `/etc/k8s4r/control-host.json` by hand
 * (docs/CONTROL_HOST.md):
 *
 *   {
 *     "format": "k8s4r-control-host",
 *     "version": 1,
 *     "trustDomain": "k8s4r.example.org",
 *     "spireServer": {
 *       "adminSocket": "/run/spire/server/api.sock",   the SPIRE server's admin API
 *       "address": "10.0.0.1:8081",                    what robots dial (its bind_address)
 *       "bin": "/usr/local/bin/spire-server",          optional: found like devenv's otherwise
 *       "defaultX509SvidTtl": "1h"                     optional: the server's default_x509_svid_ttl
 *     },
 *     "broker": {
 *       "url": "ssl://10.0.0.1:8883",                  what robots dial (an mTLS listener)
 *       "adminAddress": "127.0.0.1:1883",              the loopback password listener
 *       "adminCredentials": "/etc/k8s4r/broker-admin.json"  {"username","password"}, 0600
 *     },
 *     "robotSelectors": ["unix:uid:0"],                the robot agent's workload selectors
 *     "factoryCa": { "cert": "...", "key": "..." },    optional: x509pop (factory_ca.ts)
 *     "records": "/var/lib/k8s4r/control/robots.json"  what robot add issued (records.ts)
 *   }
 *
 * Relative paths resolve against the file's directory. Errors name the file, the line, the key
 * and what was expected.
 */
import { dirname, isAbsolute, join, resolve } from "node:path";
import { CliError, errorMessage } from "../cli/errors.ts";
import { parseBrokerUrl, parseHostPort } from "../fleet/addresses.ts";
import { parseDuration } from "../fleet/duration.ts";
import { lineOfKey } from "../fleet/enrollment.ts";
import { PRODUCTION_CONFIG_DIR } from "../fleet/paths.ts";
import type { FactoryCaFiles } from "./factory_ca.ts";

export const CONTROL_FORMAT = "k8s4r-control-host";
export const CONTROL_VERSION = 1;
export const PRODUCTION_CONTROL_CONFIG = join(PRODUCTION_CONFIG_DIR, "control-host.json");

export interface ControlHostConfig {
  /** The file it was read from (absolute). */
  file: string;
  trustDomain: string;
  spireServer: {
    adminSocket: string;
    address: string;
    bin?: string;
    /**
     * The SPIRE server's `default_x509_svid_ttl` (a duration: 1h, 90m), default 1h as SPIRE's:
     * how long a removed robot's SVIDs can stay valid, so how long `robot add` keeps it cut off.
     */
    defaultX509SvidTtl?: string;
  };
  broker: { url: string; adminAddress: string; adminCredentials: string };
  robotSelectors: string[];
  factoryCa?: FactoryCaFiles;
  records: string;
}

export class ControlConfigError extends CliError {
  constructor(file: string, line: number | undefined, key: string | undefined, expected: string) {
    super(
      `${file}${line !== undefined ? `:${line}` : ""}: ${key ? `${key}: ` : ""}${expected}`,
      2,
      "see docs/CONTROL_HOST.md for the control-host config; on a dev stack, k8s4r devenv start writes it",
    );
    this.name = "ControlConfigError";
  }
}

const SELECTOR_RE = /^[a-z0-9_]+:[^\s]+$/;

/** Parses and validates a control-host config text. Pure. */
export function parseControlConfig(text: string, file: string): ControlHostConfig {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    const pos = /position (\d+)/.exec(errorMessage(err));
    const line = pos ? text.slice(0, Number(pos[1])).split("\n").length : undefined;
    throw new ControlConfigError(file, line, undefined, `invalid JSON: ${errorMessage(err)}`);
  }
  const bad = (key: string, expected: string): never => {
    throw new ControlConfigError(file, lineOfKey(text, key), key, expected);
  };
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    return bad("", `expected a JSON object with "format": "${CONTROL_FORMAT}"`);
  }
  const get = (key: string): unknown => {
    let v: unknown = doc;
    for (const p of key.split(".")) v = (v as Record<string, unknown> | undefined)?.[p];
    return v;
  };
  const str = (key: string, what: string, optional = false): string | undefined => {
    const v = get(key);
    if (v === undefined && optional) return undefined;
    if (typeof v !== "string" || v === "") {
      return bad(key, `expected ${what}, got ${v === undefined ? "nothing" : JSON.stringify(v)}`);
    }
    return v;
  };
  const base = dirname(file);
  const path = (key: string, what: string, optional = false) => {
    const v = str(key, what, optional);
    return v === undefined ? undefined : isAbsolute(v) ? v : resolve(base, v);
  };
  if (get("format") !== CONTROL_FORMAT) {
    bad("format", `expected "${CONTROL_FORMAT}", got ${JSON.stringify(get("format"))}`);
  }
  if (get("version") !== CONTROL_VERSION) {
    bad("version", `expected ${CONTROL_VERSION}, got ${JSON.stringify(get("version"))}`);
  }
  const known: Record<string, string[]> = {
    "": [
      "format",
      "version",
      "trustDomain",
      "spireServer",
      "broker",
      "robotSelectors",
      "factoryCa",
      "records",
    ],
    spireServer: ["adminSocket", "address", "bin", "defaultX509SvidTtl"],
    broker: ["url", "adminAddress", "adminCredentials"],
    factoryCa: ["cert", "key"],
  };
  for (const [obj, keys] of Object.entries(known)) {
    const v = obj ? get(obj) : doc;
    if (v === undefined && obj === "factoryCa") continue;
    if (v === null || typeof v !== "object" || Array.isArray(v)) {
      bad(obj, "expected an object");
    }
    for (const k of Object.keys(v as object)) {
      if (!keys.includes(k)) {
        bad(obj ? `${obj}.${k}` : k, `unknown key; expected one of ${keys.join(", ")}`);
      }
    }
  }
  const trustDomain = str("trustDomain", "a trust domain like k8s4r.example.org")!;
  const address = str("spireServer.address", "the host:port robots dial for the SPIRE server")!;
  try {
    parseHostPort(address, "10.0.0.1:8081");
  } catch (err) {
    bad("spireServer.address", errorMessage(err));
  }
  const svidTtl = str(
    "spireServer.defaultX509SvidTtl",
    "the SPIRE server's default_x509_svid_ttl, like 1h",
    true,
  );
  if (svidTtl !== undefined) {
    try {
      if (parseDuration(svidTtl) < 1000) throw new Error(`expected at least 1s, got '${svidTtl}'`);
    } catch (err) {
      bad("spireServer.defaultX509SvidTtl", errorMessage(err));
    }
  }
  const url = str("broker.url", "the broker URL robots dial, like ssl://10.0.0.1:8883")!;
  try {
    parseBrokerUrl(url);
  } catch (err) {
    bad("broker.url", errorMessage(err));
  }
  const adminAddress = str("broker.adminAddress", "the loopback listener's host:port")!;
  try {
    parseHostPort(adminAddress, "127.0.0.1:1883");
  } catch (err) {
    bad("broker.adminAddress", errorMessage(err));
  }
  const sel = get("robotSelectors") ?? ["unix:uid:0"];
  if (
    !Array.isArray(sel) || sel.length === 0 ||
    !sel.every((s) => typeof s === "string" && SELECTOR_RE.test(s))
  ) {
    bad("robotSelectors", 'expected a non-empty list of selectors like ["unix:uid:0"]');
  }
  const factoryCa = get("factoryCa") === undefined ? undefined : {
    cert: path("factoryCa.cert", "the factory CA certificate (PEM)")!,
    key: path("factoryCa.key", "the factory CA key (PEM, 0600)")!,
  };
  return {
    file,
    trustDomain,
    spireServer: {
      adminSocket: path("spireServer.adminSocket", "the SPIRE server's admin socket")!,
      address,
      bin: path("spireServer.bin", "the spire-server binary", true),
      ...(svidTtl !== undefined ? { defaultX509SvidTtl: svidTtl } : {}),
    },
    broker: {
      url,
      adminAddress,
      adminCredentials: path("broker.adminCredentials", "the broker admin credentials file")!,
    },
    robotSelectors: sel as string[],
    factoryCa,
    records: path("records", "the file robot add keeps its records in")!,
  };
}

/** The document for a config (paths as given). */
export function renderControlConfig(c: Omit<ControlHostConfig, "file">): string {
  return JSON.stringify(
    {
      format: CONTROL_FORMAT,
      version: CONTROL_VERSION,
      trustDomain: c.trustDomain,
      spireServer: {
        adminSocket: c.spireServer.adminSocket,
        address: c.spireServer.address,
        ...(c.spireServer.bin ? { bin: c.spireServer.bin } : {}),
        ...(c.spireServer.defaultX509SvidTtl
          ? { defaultX509SvidTtl: c.spireServer.defaultX509SvidTtl }
          : {}),
      },
      broker: c.broker,
      robotSelectors: c.robotSelectors,
      ...(c.factoryCa ? { factoryCa: c.factoryCa } : {}),
      records: c.records,
    },
    null,
    2,
  ) + "\n";
}

export async function readControlConfig(file: string): Promise<ControlHostConfig> {
  let text: string;
  try {
    text = await Deno.readTextFile(file);
  } catch (err) {
    throw new ControlConfigError(file, undefined, undefined, `cannot read: ${errorMessage(err)}`);
  }
  return parseControlConfig(text, file);
}

/**
 * Which config `robot` commands use: `--control-config FILE`, else env `K8S4R_CONTROL_CONFIG`,
 * else the dev stack's in the project directory (when it exists), else
 * /etc/k8s4r/control-host.json.
 */
export async function findControlConfig(
  flag: string | undefined,
  env: Record<string, string | undefined>,
  cwd: string,
  devStackConfig: (cwd: string, env: Record<string, string | undefined>) => string,
): Promise<string> {
  if (flag) return resolve(cwd, flag);
  if (env["K8S4R_CONTROL_CONFIG"]) return resolve(cwd, env["K8S4R_CONTROL_CONFIG"]);
  const dev = devStackConfig(cwd, env);
  for (const f of [dev, PRODUCTION_CONTROL_CONFIG]) {
    try {
      if ((await Deno.stat(f)).isFile) return f;
    } catch { /* next */ }
  }
  throw new CliError(
    `no control-host config: neither ${dev} nor ${PRODUCTION_CONTROL_CONFIG} exists`,
    1,
    "on a dev stack run: k8s4r devenv start; otherwise write the control-host config (docs/CONTROL_HOST.md) or pass --control-config FILE",
  );
}

export interface BrokerAdminCredentials {
  username: string;
  password: string;
}

/** The admin login (a 0600 JSON file `{"username", "password"}`); refuses a readable file. */
export async function readAdminCredentials(file: string): Promise<BrokerAdminCredentials> {
  try {
    const st = await Deno.stat(file);
    if (st.mode !== null && (st.mode & 0o077) !== 0) {
      throw new CliError(
        `${file}: the broker admin credentials are readable by others; expected mode 0600`,
        1,
        `chmod 600 ${file}`,
      );
    }
    const c = JSON.parse(await Deno.readTextFile(file));
    if (typeof c?.username !== "string" || typeof c?.password !== "string" || !c.password) {
      throw new Error('expected {"username": "...", "password": "..."}');
    }
    return { username: c.username, password: c.password };
  } catch (err) {
    if (err instanceof CliError) throw err;
    throw new CliError(`${file}: broker admin credentials: ${errorMessage(err)}`);
  }
}
