/**
 * The enrollment file: everything a robot host needs to join the fleet, in one versioned JSON
 * document (mode 0600, it holds a secret). The control host writes it (`k8s4r robot add`), the
 * robot reads it once (`k8s4r agent --enroll FILE`).
 *
 *   {
 *     "format": "k8s4r-enrollment",
 *     "version": 1,
 *     "robotId": "robot-007",
 *     "trustDomain": "k8s4r.example.org",
 *     "spireServerAddress": "10.203.0.1:8081",
 *     "brokerUrl": "ssl://10.203.0.1:8883",
 *     "brokerSpiffeId": "spiffe://k8s4r.example.org/mqtt-broker",
 *     "fleetServerSpiffeId": "spiffe://k8s4r.example.org/fleet-server",
 *     "trustBundle": "-----BEGIN CERTIFICATE-----\n...",
 *     "createdAt": "2026-12-01T10:00:00.000Z",
 *     "attestation": { "type": "join_token", "token": "...", "expiresAt": "..." }
 *   }
 *
 * or, for x509pop, `"attestation": { "type": "x509pop", "certificate": "<PEM chain, leaf
 * first, issued by the factory CA for the robot's CSR>", "expiresAt": "<the leaf's notAfter>" }`.
 * The x509pop private key never leaves the robot: `k8s4r agent csr` made it there.
 *
 * Every error is one line naming the file, the line (when it can be found), the key and what was
 * expected, and says what to run on the control host for a good file.
 */
import { X509Certificate } from "node:crypto";
import { CliError } from "../cli/errors.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
import { parseSpiffeId } from "../spiffe/id.ts";
import { decodePem } from "../spiffe/pem.ts";
import { parseCertDer } from "../spiffe/x509.ts";
import { parseBrokerUrl, parseHostPort } from "./addresses.ts";
import { formatDuration } from "./duration.ts";
import { isReservedRobotId } from "./ids.ts";
import { isRobotId } from "./topics.ts";

export const ENROLLMENT_FORMAT = "k8s4r-enrollment";
export const ENROLLMENT_VERSION = 1;

export type AttestationType = "join_token" | "x509pop";
export const ATTESTATION_TYPES: readonly AttestationType[] = ["join_token", "x509pop"];

export interface JoinTokenAttestation {
  type: "join_token";
  /** The secret. Absent only in the robot's record of its enrollment (`enrollment.json`). */
  token?: string;
  expiresAt: Date;
}

export interface X509popAttestation {
  type: "x509pop";
  /** PEM chain, leaf first: the robot's certificate from the factory CA. */
  certificate: string;
  /** The leaf's notAfter. */
  expiresAt: Date;
}

export type Attestation = JoinTokenAttestation | X509popAttestation;

export interface Enrollment {
  version: number;
  robotId: string;
  trustDomain: string;
  /** `host:port` of the SPIRE server's agent API. */
  spireServerAddress: string;
  /** `ssl://host:port`. */
  brokerUrl: string;
  brokerSpiffeId: string;
  fleetServerSpiffeId: string;
  /** PEM CA certificates: the SPIRE trust bundle the robot bootstraps from. */
  trustBundle: string;
  createdAt: Date;
  attestation: Attestation;
}

const TRUST_DOMAIN_RE = /^[a-z0-9._-]+$/;
const TOKEN_RE = /^[\x21-\x7e]{1,512}$/;

/** The control-host command that makes a new enrollment file for `robotId`. */
export function robotAddCommand(robotId: string | undefined, type?: AttestationType): string {
  const id = robotId && isRobotId(robotId) ? robotId : "ROBOT_ID";
  const out = `--out ${id}.enroll.json`;
  return type === "x509pop"
    ? `k8s4r robot add ${id} --attestation x509pop --csr ${id}.csr ${out}`
    : `k8s4r robot add ${id} ${out}`;
}

/** What to run once the new file is on the robot. */
export function enrollCommand(robotId: string | undefined, dataDir?: string): string {
  const id = robotId && isRobotId(robotId) ? robotId : "ROBOT_ID";
  return `k8s4r agent --enroll ${id}.enroll.json${dataDir ? ` --data-dir ${dataDir}` : ""}`;
}

/** A bad enrollment file: `FILE:LINE: key: expected ...; on the control host run: ...`. */
export class EnrollmentError extends CliError {
  constructor(
    readonly file: string,
    readonly line: number | undefined,
    readonly key: string | undefined,
    readonly expected: string,
    readonly robotId?: string,
    readonly attestationType?: AttestationType,
  ) {
    super(
      `${file}${line !== undefined ? `:${line}` : ""}: ${key ? `${key}: ` : ""}${expected}; ` +
        `on the control host run: ${robotAddCommand(robotId, attestationType)}`,
      2,
      `then, on this robot: ${enrollCommand(robotId)}`,
    );
    this.name = "EnrollmentError";
  }
}

/**
 * The line of `key` (a dotted path such as `attestation.token`) in a JSON text, found by looking
 * for each quoted segment in turn. Good for files we pretty-print; undefined when not found.
 */
export function lineOfKey(text: string, key: string): number | undefined {
  let from = 0;
  for (const part of key.split(".")) {
    const at = text.indexOf(`${JSON.stringify(part)}:`, from);
    const at2 = at >= 0 ? at : text.indexOf(`${JSON.stringify(part)} :`, from);
    if (at2 < 0) return undefined;
    from = at2;
  }
  return text.slice(0, from).split("\n").length;
}

function describe(v: unknown): string {
  if (v === undefined) return "nothing";
  if (v === null) return "null";
  if (Array.isArray(v)) return "a list";
  if (typeof v === "object") return "an object";
  if (typeof v === "string") return JSON.stringify(v.length > 60 ? v.slice(0, 57) + "..." : v);
  return String(v);
}

export interface ParseOptions {
  /** The robot's own record (`enrollment.json`) carries no token. Default false. */
  record?: boolean;
}

/** Parses and validates an enrollment text. `file` names it in errors. Pure. */
export function parseEnrollment(text: string, file: string, opts: ParseOptions = {}): Enrollment {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    const msg = (err as Error).message;
    const pos = /position (\d+)/.exec(msg);
    const line = pos ? text.slice(0, Number(pos[1])).split("\n").length : undefined;
    throw new EnrollmentError(
      file,
      line,
      undefined,
      `expected a k8s4r enrollment file (JSON), got invalid JSON: ${msg.split("\n")[0]}`,
    );
  }
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    throw new EnrollmentError(
      file,
      undefined,
      undefined,
      `expected a JSON object with "format": "${ENROLLMENT_FORMAT}", got ${describe(doc)}`,
    );
  }
  const o = doc as Record<string, unknown>;
  const rid = typeof o.robotId === "string" && isRobotId(o.robotId) && !isReservedRobotId(o.robotId)
    ? o.robotId
    : undefined;
  const att = o.attestation as Record<string, unknown> | undefined;
  const attType = ATTESTATION_TYPES.includes(att?.type as AttestationType)
    ? att!.type as AttestationType
    : undefined;
  const bad = (key: string, expected: string): never => {
    throw new EnrollmentError(file, lineOfKey(text, key), key, expected, rid, attType);
  };
  const got = (key: string) => {
    let v: unknown = o;
    for (const p of key.split(".")) v = (v as Record<string, unknown> | undefined)?.[p];
    return v;
  };
  const str = (key: string, what: string): string => {
    const v = got(key);
    if (typeof v !== "string" || v === "") return bad(key, `expected ${what}, got ${describe(v)}`);
    return v;
  };
  const time = (key: string): Date => {
    const v = got(key);
    const d = typeof v === "string" && /^\d{4}-\d\d-\d\dT/.test(v) ? new Date(v) : undefined;
    if (!d || isNaN(d.getTime())) {
      return bad(key, `expected an ISO 8601 time like 2026-12-01T10:00:00Z, got ${describe(v)}`);
    }
    return d;
  };

  if (o.format !== ENROLLMENT_FORMAT) {
    bad(
      "format",
      `expected "${ENROLLMENT_FORMAT}" (is this an enrollment file?), got ${describe(o.format)}`,
    );
  }
  if (o.version !== ENROLLMENT_VERSION) {
    if (typeof o.version === "number" && o.version > ENROLLMENT_VERSION) {
      bad(
        "version",
        `expected version ${ENROLLMENT_VERSION}, got ${o.version}: written by a newer k8s4r; upgrade k8s4r on this robot, or`,
      );
    }
    bad("version", `expected ${ENROLLMENT_VERSION}, got ${describe(o.version)}`);
  }
  const known = new Set([
    "format",
    "version",
    "robotId",
    "trustDomain",
    "spireServerAddress",
    "brokerUrl",
    "brokerSpiffeId",
    "fleetServerSpiffeId",
    "trustBundle",
    "createdAt",
    "attestation",
    ...(opts.record ? ["enrolledAt"] : []),
  ]);
  for (const k of Object.keys(o)) {
    if (!known.has(k)) bad(k, `unknown key; expected one of ${[...known].join(", ")}`);
  }

  const robotId = str("robotId", "a robot id like robot-007");
  if (!isRobotId(robotId)) {
    bad("robotId", `expected [a-z0-9][a-z0-9-]{0,62}, got ${describe(robotId)}`);
  }
  if (isReservedRobotId(robotId)) {
    bad("robotId", `expected a robot id, got the reserved name ${describe(robotId)}`);
  }
  const trustDomain = str("trustDomain", "a trust domain like k8s4r.example.org");
  if (!TRUST_DOMAIN_RE.test(trustDomain)) {
    bad(
      "trustDomain",
      `expected lowercase letters, digits, '.', '-', '_', got ${describe(trustDomain)}`,
    );
  }
  const spireServerAddress = str("spireServerAddress", "the SPIRE server's host:port");
  try {
    parseHostPort(spireServerAddress, "10.203.0.1:8081");
  } catch (err) {
    bad("spireServerAddress", (err as Error).message);
  }
  const brokerUrl = str("brokerUrl", "the broker's URL like ssl://10.203.0.1:8883");
  try {
    parseBrokerUrl(brokerUrl);
  } catch (err) {
    bad("brokerUrl", (err as Error).message);
  }
  const ids: Record<string, string> = {};
  for (const key of ["brokerSpiffeId", "fleetServerSpiffeId"]) {
    const v = str(key, `a SPIFFE ID like spiffe://${trustDomain}/...`);
    try {
      const id = parseSpiffeId(v);
      if (id.trustDomain.name !== trustDomain) {
        bad(key, `expected a SPIFFE ID in trust domain ${trustDomain}, got ${describe(v)}`);
      }
    } catch (err) {
      if (err instanceof EnrollmentError) throw err;
      bad(key, `expected a SPIFFE ID like spiffe://${trustDomain}/..., got ${describe(v)}`);
    }
    ids[key] = v;
  }
  const trustBundle = str("trustBundle", "the SPIRE trust bundle (PEM CA certificates)");
  const bundleErr = checkPemCerts(trustBundle, "ca");
  if (bundleErr) bad("trustBundle", bundleErr);
  const createdAt = time("createdAt");

  if (!att || typeof att !== "object" || Array.isArray(att)) {
    return bad(
      "attestation",
      `expected {"type": "join_token" | "x509pop", ...}, got ${describe(att)}`,
    );
  }
  if (!attType) {
    return bad("attestation.type", `expected "join_token" or "x509pop", got ${describe(att.type)}`);
  }
  const attKeys = attType === "join_token"
    ? ["type", "token", "expiresAt"]
    : ["type", "certificate", "expiresAt"];
  for (const k of Object.keys(att)) {
    if (!attKeys.includes(k)) {
      bad(`attestation.${k}`, `unknown key for ${attType}; expected one of ${attKeys.join(", ")}`);
    }
  }
  const expiresAt = time("attestation.expiresAt");
  let attestation: Attestation;
  if (attType === "join_token") {
    let token: string | undefined;
    if (opts.record) {
      if (att.token !== undefined) {
        bad(
          "attestation.token",
          "expected no token in the robot's record (it lives in join-token)",
        );
      }
    } else {
      const t = att.token;
      // Never echo a token, not even a malformed one.
      if (typeof t !== "string" || !TOKEN_RE.test(t)) {
        bad(
          "attestation.token",
          `expected the join token (1..512 printable characters, no spaces), got ${
            typeof t === "string" ? `a string of ${t.length} characters` : describe(t)
          }`,
        );
      }
      token = t as string;
    }
    attestation = { type: "join_token", ...(token !== undefined ? { token } : {}), expiresAt };
  } else {
    const certificate = str("attestation.certificate", "the robot's PEM certificate chain");
    const err = checkPemCerts(certificate, "leaf");
    if (err) bad("attestation.certificate", err);
    const leaf = new X509Certificate(decodePem(certificate)[0].der);
    const cn = commonName(leaf);
    if (cn !== robotId) {
      bad(
        "attestation.certificate",
        `expected a certificate for CN=${robotId}, got ${cn ? `CN=${cn}` : "no CN"}`,
      );
    }
    const info = parseCertDer(new Uint8Array(leaf.raw));
    if (!info.keyUsage?.digitalSignature) {
      bad(
        "attestation.certificate",
        "expected a certificate with keyUsage digitalSignature (x509pop signs a challenge with it)",
      );
    }
    if (Math.abs(info.notAfter.getTime() - expiresAt.getTime()) > 1000) {
      bad(
        "attestation.expiresAt",
        `expected the certificate's notAfter ${info.notAfter.toISOString()}, got ${expiresAt.toISOString()}`,
      );
    }
    attestation = { type: "x509pop", certificate, expiresAt };
  }
  return {
    version: ENROLLMENT_VERSION,
    robotId,
    trustDomain,
    spireServerAddress,
    brokerUrl,
    brokerSpiffeId: ids.brokerSpiffeId,
    fleetServerSpiffeId: ids.fleetServerSpiffeId,
    trustBundle,
    createdAt,
    attestation,
  };
}

/** The CN of a certificate's subject, or undefined. */
export function commonName(cert: X509Certificate): string | undefined {
  return /(?:^|\n|, )CN=([^\n,]+)/.exec(cert.subject)?.[1];
}

/** Undefined when `pem` holds only good certificates of the wanted kind, else what is wrong. */
function checkPemCerts(pem: string, kind: "ca" | "leaf"): string | undefined {
  let blocks;
  try {
    blocks = decodePem(pem);
  } catch (err) {
    return `expected PEM certificates, got malformed PEM: ${(err as Error).message}`;
  }
  if (blocks.length === 0) return "expected PEM certificates, got no PEM block";
  for (const [i, b] of blocks.entries()) {
    if (b.type !== "CERTIFICATE") {
      return `expected only CERTIFICATE blocks, got ${b.type} (block ${i + 1})${
        /PRIVATE KEY/.test(b.type) ? ": a private key must never be in this file" : ""
      }`;
    }
    let info;
    try {
      new X509Certificate(b.der);
      info = parseCertDer(b.der);
    } catch (err) {
      return `certificate ${i + 1} does not parse: ${(err as Error).message}`;
    }
    if (kind === "ca" && !info.isCa) {
      return `expected CA certificates, certificate ${i + 1} is not a CA`;
    }
    if (kind === "leaf" && i === 0 && info.isCa) {
      return "expected the robot's own certificate first, got a CA certificate";
    }
  }
  return undefined;
}

/** The robot's record of its enrollment: the document less its secret, plus when it enrolled. */
export function enrollmentRecord(e: Enrollment, enrolledAt: Date): Record<string, unknown> {
  const doc = enrollmentJson(e);
  const att = { ...(doc.attestation as Record<string, unknown>) };
  delete att.token;
  return { ...doc, attestation: att, enrolledAt: enrolledAt.toISOString() };
}

/** The document as written (key order fixed, times in ISO 8601). */
export function enrollmentJson(e: Enrollment): Record<string, unknown> {
  const a = e.attestation;
  return {
    format: ENROLLMENT_FORMAT,
    version: ENROLLMENT_VERSION,
    robotId: e.robotId,
    trustDomain: e.trustDomain,
    spireServerAddress: e.spireServerAddress,
    brokerUrl: e.brokerUrl,
    brokerSpiffeId: e.brokerSpiffeId,
    fleetServerSpiffeId: e.fleetServerSpiffeId,
    trustBundle: e.trustBundle,
    createdAt: e.createdAt.toISOString(),
    attestation: a.type === "join_token"
      ? {
        type: a.type,
        ...(a.token !== undefined ? { token: a.token } : {}),
        expiresAt: a.expiresAt.toISOString(),
      }
      : { type: a.type, certificate: a.certificate, expiresAt: a.expiresAt.toISOString() },
  };
}

/** The file's text: pretty JSON, validated by parsing it back. Throws on an invalid enrollment. */
export function renderEnrollment(e: Enrollment): string {
  const text = JSON.stringify(enrollmentJson(e), null, 2) + "\n";
  parseEnrollment(text, "(enrollment being written)");
  return text;
}

/**
 * Writes an enrollment file with mode 0600 (it holds a join token, or at least the robot's
 * credentials' public half) by the project's atomic writer: a new file, 0600 from its creation,
 * renamed over the path. Never written in place: a file someone made (0644) and keeps open would
 * otherwise show them the token, whatever its mode becomes. Used by `k8s4r robot add`.
 */
export async function writeEnrollmentFile(path: string, e: Enrollment): Promise<void> {
  await writeFileAtomic(path, renderEnrollment(e), 0o600);
}

/** The text of an enrollment file; a missing or unreadable file is an EnrollmentError. */
export async function readEnrollmentText(path: string): Promise<string> {
  try {
    return await Deno.readTextFile(path);
  } catch (err) {
    throw new EnrollmentError(
      path,
      undefined,
      undefined,
      err instanceof Deno.errors.NotFound
        ? "file not found; expected the enrollment file the control host wrote"
        : `cannot read: ${(err as Error).message.split("\n")[0]}`,
    );
  }
}

/** Reads and parses an enrollment file. A missing or unreadable file is an EnrollmentError too. */
export async function readEnrollmentFile(
  path: string,
  opts: ParseOptions = {},
): Promise<Enrollment> {
  return parseEnrollment(await readEnrollmentText(path), path, opts);
}

/**
 * Throws an EnrollmentError when the enrollment can no longer be used at `now`: an expired
 * join token (single use, short-lived) or an expired x509pop certificate. Also refuses a file
 * whose createdAt lies more than `skewMs` in the future: this host's clock is behind.
 */
export function checkEnrollmentUsable(
  e: Enrollment,
  file: string,
  text: string | undefined,
  now: number,
  skewMs = 5 * 60_000,
): void {
  const line = (k: string) => (text !== undefined ? lineOfKey(text, k) : undefined);
  const a = e.attestation;
  if (e.createdAt.getTime() - now > skewMs) {
    throw new CliError(
      `${file}: createdAt: the file was written at ${e.createdAt.toISOString()}, ${
        formatDuration(e.createdAt.getTime() - now)
      } after this host's clock (${new Date(now).toISOString()}): the clock is behind`,
      1,
      "set the clock (timedatectl set-ntp true; chronyc makestep), then enroll again",
    );
  }
  if (a.expiresAt.getTime() <= now) {
    const ago = formatDuration(now - a.expiresAt.getTime());
    const what = a.type === "join_token"
      ? `the join token expired at ${a.expiresAt.toISOString()} (${ago} ago); join tokens are single use and short-lived`
      : `the x509pop certificate expired at ${a.expiresAt.toISOString()} (${ago} ago)`;
    throw new EnrollmentError(
      file,
      line("attestation.expiresAt"),
      "attestation.expiresAt",
      what,
      e.robotId,
      a.type,
    );
  }
}

/** What to run to enroll a robot again: on the control host, then on the robot. */
export function reenrollHint(robotId: string, type?: AttestationType, dataDir?: string): string {
  return `on the control host run: ${robotAddCommand(robotId, type)}; then on this robot: ${
    enrollCommand(robotId, dataDir)
  }`;
}

/**
 * A join-token robot whose agent SVID expired: the one sentence the agent and the doctor say.
 * Its token was used up by the first attestation, so it cannot come back by itself.
 */
export function lockedOutMessage(robotId: string, notAfter: Date, now: number): string {
  return `the agent SVID of ${robotId} expired at ${notAfter.toISOString()} (${
    formatDuration(now - notAfter.getTime())
  } ago): the robot was off longer than the SVID's lifetime, and a join-token robot cannot attest again with its used token`;
}

/** An x509pop robot whose agent SVID expired: it proves possession of its key again. */
export function reattestsMessage(robotId: string, notAfter: Date, now: number): string {
  return `the agent SVID of ${robotId} expired at ${notAfter.toISOString()} (${
    formatDuration(now - notAfter.getTime())
  } ago); x509pop re-attests on its own with the robot's key and certificate when spire-agent starts`;
}
