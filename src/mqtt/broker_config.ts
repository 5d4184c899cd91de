/**
 * Mosquitto 2.0 configuration for k8s4r: an mTLS listener for robots (identity = certificate CN,
 * each robot confined to its own topics by ACL) and a loopback-only password listener for the
 * fleet server. Also writes the password file in mosquitto's own `$7$` PBKDF2-SHA512 format, so
 * that no password ever appears on a command line (`mosquitto_passwd -b` would put it in `ps`).
 *
 * Checked against mosquitto 2.0.11 (Debian 12):
 * - `tls_version tlsv1.2` sets the MINIMUM protocol version of a listener (1.2 and 1.3 accepted);
 *   tests/server_broker_test.ts asserts that a TLS 1.1 handshake is refused.
 * - With `per_listener_settings true`, `allow_anonymous`, `password_file` and `acl_file` are
 *   scoped to the listener block they follow.
 * - A `read` ACL grants both SUBSCRIBE and receiving; mosquitto checks it again on delivery, so a
 *   wildcard subscription never leaks another robot's messages.
 *
 * Limits (man mosquitto.conf, 2.0.11, and src/database.c `db__ready_for_queue`):
 * - `max_queued_messages` and `max_queued_bytes` bound, PER CLIENT, the QoS 1/2 messages queued
 *   beyond those in flight (while it is offline or slow); the first limit reached wins, and
 *   further messages for that client are dropped. The fleet server is one client that receives
 *   every robot's messages, so these bound what a flooding robot can pile into its session.
 * - `max_packet_size`: a client sending a larger packet is disconnected (DISCONNECT 0x95; MQTT 5
 *   clients are told the limit in CONNACK). It exists in 2.0.11 and is the current way: Mosquitto
 *   2.1 asks to replace `message_size_limit` with it. We do not write `message_size_limit`: in
 *   2.0.11 it answers a too-large QoS 1 PUBLISH with PUBACK 0x95, a reason code MQTT 5 does not
 *   allow in PUBACK; mqtt.js 5.16 rejects that PUBACK ("Invalid puback reason code") and drops
 *   the connection, so a durable queue would resend the same message forever (tested in
 *   tests/broker_limits_test.ts). A payload between 256 KiB and the packet limit still reaches
 *   the receiver, which drops and counts it (`too-large`).
 * - There is no per-client publish rate limit in Mosquitto 2.0 (nor a message count per time in
 *   2.1; 2.1 enforces the MQTT 5 receive maximum, which bounds QoS 1 messages in flight, not a
 *   rate). A rate limit needs a plugin or the fleet server's own accounting.
 */
import { pbkdf2Sync, randomBytes, timingSafeEqual } from "node:crypto";
import { join } from "node:path";
import { TOPIC_ROOT } from "../fleet/topics.ts";
import { MAX_PAYLOAD_BYTES } from "./messages.ts";

/** Default `max_queued_messages`: per client (the fleet server's session above all). */
export const DEFAULT_MAX_QUEUED_MESSAGES = 100_000;
/** Default `max_queued_bytes` (payload bytes): 512 full-size results, ~20 min of 1000 robots. */
export const DEFAULT_MAX_QUEUED_BYTES = 128 * 1024 * 1024;
/** `max_packet_size`: the payload limit plus room for the fixed header, topic and properties. */
export const MAX_PACKET_SIZE = MAX_PAYLOAD_BYTES + 4096;

/** mosquitto_passwd's defaults for `-H sha512-pbkdf2` (2.0.x): 12-byte salt, 101 iterations. */
export const PBKDF2_ITERATIONS = 101;
const SALT_BYTES = 12;
const HASH_BYTES = 64;

/**
 * Hashes a password as mosquitto 2.0 does: `$7$<iterations>$<base64 salt>$<base64 hash>` with
 * PBKDF2-HMAC-SHA512. The result is the part after `username:` in a password file.
 */
export function hashPassword(
  password: string,
  opts: { iterations?: number; salt?: Uint8Array } = {},
): string {
  const iterations = opts.iterations ?? PBKDF2_ITERATIONS;
  if (!Number.isInteger(iterations) || iterations < 1) {
    throw new Error(`hashPassword: iterations must be a positive integer, got ${iterations}`);
  }
  const salt = opts.salt ?? randomBytes(SALT_BYTES);
  const hash = pbkdf2Sync(password, salt, iterations, HASH_BYTES, "sha512");
  return `$7$${iterations}$${Buffer.from(salt).toString("base64")}$${hash.toString("base64")}`;
}

/** Checks a password against a `$7$` hash (also those written by `mosquitto_passwd`). */
export function verifyPassword(password: string, encoded: string): boolean {
  const m = /^\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$/.exec(encoded);
  if (!m) return false;
  const iterations = Number(m[1]);
  const salt = Buffer.from(m[2], "base64");
  const expected = Buffer.from(m[3], "base64");
  if (iterations < 1 || expected.length === 0) return false;
  const got = pbkdf2Sync(password, salt, iterations, expected.length, "sha512");
  return timingSafeEqual(got, expected);
}

/** A random password for the server's 1883 login (URL-safe, 32 bytes of entropy). */
export function generatePassword(): string {
  return randomBytes(32).toString("base64url");
}

export interface BrokerConfigOptions {
  /** mTLS listener for robots. */
  tlsPort: number;
  /** Address of the mTLS listener. Default 127.0.0.1; a real fleet binds a reachable address. */
  tlsBind?: string;
  /** Password listener for the fleet server, always bound to 127.0.0.1. */
  plainPort: number;
  /** The SPIRE trust bundle (PEM): the CAs robot certificates must chain to. */
  cafile: string;
  /** The broker's own SVID (PEM chain) and key. */
  certfile: string;
  keyfile: string;
  /** The fleet server's login on the plain listener. */
  server: { username: string; password: string };
  /**
   * Certificate CNs on the TLS listener that get `readwrite k8s4r/#` (a fleet server connecting
   * with its own SVID via `--broker-url mqtts://`). Empty by default: robots only.
   */
  tlsAdminUsers?: string[];
  /** Default `<dir>/data/`. */
  persistenceDir?: string;
  /** Where mosquitto writes its log (`log_dest file`). Default `<dir>/mosquitto.log`. */
  logFile?: string;
  /** Seconds between persistence saves (with autosave_on_changes false). Default 1. */
  autosaveIntervalSeconds?: number;
  /** Per-client queue of QoS 1/2 messages while offline or in flight. Default 100000. */
  maxQueuedMessages?: number;
  /** Per-client queue of QoS 1/2 messages, in payload bytes. Default 128 MiB. */
  maxQueuedBytes?: number;
  /** Persistent sessions not seen for this long are dropped (mosquitto syntax). Default 30d. */
  persistentClientExpiration?: string;
  /**
   * `user` option: the account mosquitto drops privileges to when started as root. Default: the
   * owner of the files we write ("root" when we run as root), so that it can read the 0600 key
   * and password file and write its persistence directory.
   */
  runAsUser?: string;
}

export interface BrokerFiles {
  config: string;
  tlsAcl: string;
  plainAcl: string;
  passwordFile: string;
  persistenceDir: string;
  logFile: string;
}

/** The ACL of the robot (mTLS) listener. `%u` is the certificate CN, i.e. the robot id. */
export function renderTlsAcl(adminUsers: string[] = []): string {
  const lines = [
    "# k8s4r robot listener ACL (generated; do not edit).",
    "# Username = certificate CN = robot id (use_identity_as_username).",
    "# A robot may publish only under its own up/ subtree and read only its own down/ subtree.",
    `pattern write ${TOPIC_ROOT}/%u/up/#`,
    `pattern read ${TOPIC_ROOT}/%u/down/#`,
  ];
  for (const u of adminUsers) {
    assertAclUser(u);
    lines.push("", `user ${u}`, `topic readwrite k8s4r/#`);
  }
  return lines.join("\n") + "\n";
}

/** The ACL of the loopback password listener: the server user may touch all of k8s4r/. */
export function renderPlainAcl(serverUsername: string): string {
  assertAclUser(serverUsername);
  return [
    "# k8s4r server listener ACL (generated; do not edit).",
    `user ${serverUsername}`,
    "topic readwrite k8s4r/#",
    "",
  ].join("\n");
}

function assertAclUser(u: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(u)) {
    throw new Error(`invalid MQTT username ${JSON.stringify(u)}: expected [A-Za-z0-9._-]`);
  }
}

function assertPath(label: string, p: string): void {
  // mosquitto.conf has no quoting: a value runs to the end of the line.
  if (p.includes("\n") || p.trim() !== p || p === "") {
    throw new Error(`${label}: path ${JSON.stringify(p)} cannot be written to mosquitto.conf`);
  }
}

export function renderMosquittoConf(
  opts: BrokerConfigOptions,
  files: Omit<BrokerFiles, "config">,
): string {
  for (
    const [label, p] of Object.entries({
      cafile: opts.cafile,
      certfile: opts.certfile,
      keyfile: opts.keyfile,
      ...files,
    })
  ) assertPath(label, p);
  const port = (label: string, n: number) => {
    if (!Number.isInteger(n) || n < 1 || n > 65535) {
      throw new Error(`${label}: expected a port in [1, 65535], got ${n}`);
    }
    return n;
  };
  const positive = (label: string, n: number) => {
    if (!Number.isInteger(n) || n < 1) {
      throw new Error(`${label}: expected a positive integer, got ${n}`);
    }
    return n;
  };
  const bind = opts.tlsBind ?? "127.0.0.1";
  if (!/^[0-9A-Za-z.:-]+$/.test(bind)) throw new Error(`tlsBind: invalid address ${bind}`);
  const user = opts.runAsUser ?? defaultRunAsUser();
  return [
    "# k8s4r Mosquitto 2.0 configuration (generated by k8s4r; do not edit).",
    "per_listener_settings true",
    ...(user ? [`user ${user}`] : []),
    "",
    "# Persistence: the server's persistent session and its queued QoS 1 messages survive a",
    "# broker restart; saved every few seconds so that even a kill -9 loses little.",
    "persistence true",
    `persistence_location ${
      files.persistenceDir.endsWith("/") ? files.persistenceDir : files.persistenceDir + "/"
    }`,
    `autosave_interval ${opts.autosaveIntervalSeconds ?? 1}`,
    "autosave_on_changes false",
    `persistent_client_expiration ${opts.persistentClientExpiration ?? "30d"}`,
    "# Per-client queues (the fleet server's session receives every robot's messages): a",
    "# flooding robot fills them up to these bounds, then further messages are dropped.",
    `max_queued_messages ${
      positive("maxQueuedMessages", opts.maxQueuedMessages ?? DEFAULT_MAX_QUEUED_MESSAGES)
    }`,
    `max_queued_bytes ${
      positive("maxQueuedBytes", opts.maxQueuedBytes ?? DEFAULT_MAX_QUEUED_BYTES)
    }`,
    // QoS 1 messages in flight to one client. The server is a single subscriber for the whole
    // fleet: Mosquitto's default of 20 would cap its ingest at 20 per round trip.
    "max_inflight_messages 1000",
    "# A packet above the protocol's 256 KiB payload (plus headers) cuts the connection.",
    "# Mosquitto 2.0 has no per-client rate limit.",
    `max_packet_size ${MAX_PACKET_SIZE}`,
    "set_tcp_nodelay true",
    "",
    `log_dest file ${files.logFile}`,
    "log_type error",
    "log_type warning",
    "log_type notice", // connections and disconnections (information is mostly autosave noise)
    "connection_messages true",
    "log_timestamp true",
    "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    "",
    "# Robots: mutual TLS; the certificate CN (the robot id) is the username.",
    `listener ${port("tlsPort", opts.tlsPort)} ${bind}`,
    "protocol mqtt",
    "allow_anonymous false",
    `cafile ${opts.cafile}`,
    `certfile ${opts.certfile}`,
    `keyfile ${opts.keyfile}`,
    "require_certificate true",
    "use_identity_as_username true",
    "# Minimum TLS version (1.2 and 1.3 are accepted).",
    "tls_version tlsv1.2",
    `acl_file ${files.tlsAcl}`,
    "",
    "# The fleet server: password login, loopback only.",
    `listener ${port("plainPort", opts.plainPort)} 127.0.0.1`,
    "protocol mqtt",
    "allow_anonymous false",
    `password_file ${files.passwordFile}`,
    `acl_file ${files.plainAcl}`,
    "",
  ].join("\n");
}

function defaultRunAsUser(): string | undefined {
  try {
    return Deno.uid() === 0 ? "root" : undefined;
  } catch {
    return undefined;
  }
}

async function writeFileMode(path: string, text: string, mode: number): Promise<void> {
  const tmp = `${path}.tmp-${Deno.pid}`;
  await Deno.writeTextFile(tmp, text, { mode });
  await Deno.chmod(tmp, mode);
  await Deno.rename(tmp, path);
}

/**
 * Writes mosquitto.conf, both ACL files and the password file (0600) into `dir` (created 0700),
 * and creates the persistence directory. Existing files are replaced atomically.
 */
export async function writeBrokerFiles(
  dir: string,
  opts: BrokerConfigOptions,
): Promise<BrokerFiles> {
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  const files: BrokerFiles = {
    config: join(dir, "mosquitto.conf"),
    tlsAcl: join(dir, "acl-robots"),
    plainAcl: join(dir, "acl-server"),
    passwordFile: join(dir, "passwd"),
    persistenceDir: opts.persistenceDir ?? join(dir, "data"),
    logFile: opts.logFile ?? join(dir, "mosquitto.log"),
  };
  await Deno.mkdir(files.persistenceDir, { recursive: true, mode: 0o700 });
  assertAclUser(opts.server.username);
  if (opts.server.password.includes("\n") || opts.server.password === "") {
    throw new Error("server password must be a non-empty single line");
  }
  await writeFileMode(
    files.passwordFile,
    `${opts.server.username}:${hashPassword(opts.server.password)}\n`,
    0o600,
  );
  await writeFileMode(files.tlsAcl, renderTlsAcl(opts.tlsAdminUsers), 0o644);
  await writeFileMode(files.plainAcl, renderPlainAcl(opts.server.username), 0o644);
  await writeFileMode(files.config, renderMosquittoConf(opts, files), 0o644);
  return files;
}
