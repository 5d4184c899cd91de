/**
 * Mosquitto 2.0 configuration for k8s4r: an mTLS listener for robots (identity = certificate CN,
 * each robot confined to its own topics by ACL) and a loopback-only password listener for the
 * fleet server. Also writes the password file in mosquitto's own `$7$` PBKDF2-SHA512 format, so
 * that no password ever appears on a command line (`mosquitto_passwd -b` would put it in `ps`).
 *
 * Global auth settings (no `per_listener_settings`), checked against mosquitto 2.0.11 (Debian 12)
 * and 2.0.21 (bookworm-backports):
 * - Why global: with `per_listener_settings true`, 2.0.21 loses the QoS 1 messages queued for an
 *   offline persistent client (the fleet server) across a kill -9 ("Failed to associate persisted
 *   user ... with ACLs"); tests/broker_persistence_test.ts runs that repro against the installed
 *   broker. So one `password_file`, one `acl_file` and one `plugin` serve both listeners.
 * - The guarantees stay: 1883 listens on 127.0.0.1 only and wants a password (`allow_anonymous
 *   false`; only the fleet server and the control host's admin are in the password file); 8883
 *   wants a client certificate from the SPIRE bundle and takes its CN as the username
 *   (`use_identity_as_username`: Mosquitto then skips password auth for it, handle_connect.c
 *   "Authentication assumed to be cleared"); the ACL patterns confine each CN to its own subtree.
 *   Because a certificate CN becomes a username without a password, the ACL's `user` names
 *   (`k8s4r-server`, `k8s4r-admin`) must never be a CN: robot ids starting with `k8s4r-` are
 *   reserved (src/fleet/ids.ts) and `k8s4r robot add` refuses them.
 * - The dynamic-security plugin (src/mqtt/dynsec.ts) runs before the ACL file: it defers on
 *   every username it does not know, and answers "denied" for a removed robot (`k8s4r robot
 *   remove`), which it also disconnects at once.
 * - `tls_version tlsv1.2` sets the MINIMUM protocol version of a listener (1.2 and 1.3 accepted);
 *   tests/server_broker_test.ts asserts that a TLS 1.1 handshake is refused.
 * - A `read` ACL grants both SUBSCRIBE and receiving; mosquitto checks it again on delivery, so a
 *   wildcard subscription never leaks another robot's messages.
 * - `use_username_as_clientid true` in each TLS listener block: a certificate client's MQTT
 *   client id is its CN, whatever its CONNECT says. Without it any robot certificate (a removed
 *   one too: Mosquitto checks nothing of a certificate client at CONNECT) could connect as
 *   `k8s4r-server` or as another robot and take that session over (the victim is disconnected;
 *   with a clean start its persistent session and queued messages are deleted):
 *   tests/broker_clientid_test.ts. So a client on the TLS listener can only ever take over its
 *   own session, and two connections with one certificate (two fleet servers sharing one SVID
 *   over mqtts://) take turns kicking each other: give each its own CN.
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
import { TOPIC_ROOT, UP_KINDS } from "../fleet/topics.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
import { DYNSEC_CONTROL_TOPICS, ensureDynsecFile } from "./dynsec.ts";
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
  /**
   * Address(es) of the mTLS listener, one listener each on `tlsPort`. Default 127.0.0.1; a
   * control host that serves remote robots adds the address it advertises (`--advertise`).
   */
  tlsBind?: string | string[];
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
   * The control host's login on the plain listener for the dynamic-security plugin's
   * `$CONTROL/dynamic-security/#` topics (`k8s4r robot remove`); nothing else.
   */
  admin?: { username: string; password: string };
  /**
   * `mosquitto_dynamic_security.so` (`findDynsecPlugin`), loaded for both listeners. Without it
   * a removed robot cannot be cut off the broker before its SVID expires.
   */
  dynsecPlugin?: string;
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
  /** The one ACL file of both listeners. */
  aclFile: string;
  passwordFile: string;
  /** The dynamic-security plugin's state (removed robots); the plugin rewrites it. */
  dynsecFile: string;
  persistenceDir: string;
  logFile: string;
}

export interface AclUsers {
  /** The fleet server's username (password login): all of k8s4r/. */
  server: string;
  /** The control host's dynamic-security admin: `$CONTROL/dynamic-security/#` only. */
  admin?: string;
  /** Certificate CNs that get all of k8s4r/ (a fleet server on the TLS listener). */
  tlsAdminUsers?: string[];
}

/**
 * The ACL of both listeners. On the mTLS listener the username is the certificate CN, i.e. the
 * robot id (`%u`): a robot may publish only under its own up/ subtree and read only its own
 * down/ subtree. The `user` blocks name logins a robot can never have (reserved ids).
 */
export function renderAcl(users: AclUsers): string {
  assertAclUser(users.server);
  const lines = [
    "# k8s4r broker ACL (generated; do not edit): one file for both listeners.",
    "# The fleet server (password login on the loopback listener).",
    `user ${users.server}`,
    "topic readwrite k8s4r/#",
  ];
  if (users.admin) {
    assertAclUser(users.admin);
    lines.push(
      "",
      "# The control host's admin: the dynamic-security plugin's control topics only.",
      `user ${users.admin}`,
      `topic readwrite ${DYNSEC_CONTROL_TOPICS}`,
    );
  }
  for (const u of users.tlsAdminUsers ?? []) {
    assertAclUser(u);
    lines.push("", `user ${u}`, "topic readwrite k8s4r/#");
  }
  lines.push(
    "",
    "# Robots: username = certificate CN = robot id (use_identity_as_username). One write",
    "# pattern per up kind of the protocol: with up/# a robot could retain any number of",
    "# made-up sub-topics, each replayed to the fleet server on every subscribe.",
    ...UP_KINDS.map((kind) => `pattern write ${TOPIC_ROOT}/%u/up/${kind}`),
    `pattern read ${TOPIC_ROOT}/%u/down/#`,
  );
  return lines.join("\n") + "\n";
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
  const binds = [opts.tlsBind ?? "127.0.0.1"].flat();
  for (const b of binds) {
    if (!/^[0-9A-Za-z.:-]+$/.test(b)) throw new Error(`tlsBind: invalid address ${b}`);
  }
  if (binds.length === 0 || new Set(binds).size !== binds.length) {
    throw new Error(`tlsBind: expected distinct addresses, got ${JSON.stringify(binds)}`);
  }
  if (opts.dynsecPlugin !== undefined) assertPath("dynsecPlugin", opts.dynsecPlugin);
  const user = opts.runAsUser ?? defaultRunAsUser();
  return [
    "# k8s4r Mosquitto 2.0 configuration (generated by k8s4r; do not edit).",
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
    "# Authentication and ACLs, global: both listeners (no per_listener_settings, see above).",
    "allow_anonymous false",
    `password_file ${files.passwordFile}`,
    `acl_file ${files.aclFile}`,
    ...(opts.dynsecPlugin
      ? [
        "# Removed robots: denied everything and disconnected (k8s4r robot remove).",
        `plugin ${opts.dynsecPlugin}`,
        `plugin_opt_config_file ${files.dynsecFile}`,
      ]
      : []),
    "",
    ...binds.flatMap((bind) => [
      "# Robots: mutual TLS; the certificate CN (the robot id) is the username.",
      `listener ${port("tlsPort", opts.tlsPort)} ${bind}`,
      "protocol mqtt",
      `cafile ${opts.cafile}`,
      `certfile ${opts.certfile}`,
      `keyfile ${opts.keyfile}`,
      "require_certificate true",
      "use_identity_as_username true",
      "# The client id is the username (the CN) too: a certificate can never choose another",
      "# client's id (k8s4r-server, another robot) and take its session over. Per listener: a",
      "# global use_username_as_clientid has no effect on a listener block (2.0.21).",
      "use_username_as_clientid true",
      "# Minimum TLS version (1.2 and 1.3 are accepted).",
      "tls_version tlsv1.2",
      "",
    ]),
    "# The fleet server and the control host's admin: password login, loopback only.",
    `listener ${port("plainPort", opts.plainPort)} 127.0.0.1`,
    "protocol mqtt",
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

/** Where `writeBrokerFiles(dir, opts)` puts each file (a backup reads them from here too). */
export function brokerFiles(
  dir: string,
  opts: Pick<BrokerConfigOptions, "persistenceDir" | "logFile"> = {},
): BrokerFiles {
  return {
    config: join(dir, "mosquitto.conf"),
    aclFile: join(dir, "acl"),
    passwordFile: join(dir, "passwd"),
    dynsecFile: join(dir, "dynamic-security.json"),
    persistenceDir: opts.persistenceDir ?? join(dir, "data"),
    logFile: opts.logFile ?? join(dir, "mosquitto.log"),
  };
}

/**
 * Writes mosquitto.conf, the ACL file and the password file (0600) into `dir` (created 0700),
 * creates the persistence directory, and (with the plugin) the dynamic-security state if it is
 * missing. Existing generated files are replaced atomically.
 */
export async function writeBrokerFiles(
  dir: string,
  opts: BrokerConfigOptions,
): Promise<BrokerFiles> {
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  const files = brokerFiles(dir, opts);
  await Deno.mkdir(files.persistenceDir, { recursive: true, mode: 0o700 });
  const logins = [opts.server, ...(opts.admin ? [opts.admin] : [])];
  for (const l of logins) {
    assertAclUser(l.username);
    if (l.password.includes("\n") || l.password === "") {
      throw new Error(`the password of ${l.username} must be a non-empty single line`);
    }
  }
  if (opts.admin && opts.admin.username === opts.server.username) {
    throw new Error(`the admin login must differ from the server's (${opts.server.username})`);
  }
  await writeFileAtomic(
    files.passwordFile,
    logins.map((l) => `${l.username}:${hashPassword(l.password)}\n`).join(""),
    0o600,
  );
  await writeFileAtomic(
    files.aclFile,
    renderAcl({
      server: opts.server.username,
      admin: opts.admin?.username,
      tlsAdminUsers: opts.tlsAdminUsers,
    }),
    0o600,
  );
  // Kept across restarts: it holds the removed robots (the plugin itself rewrites it).
  if (opts.dynsecPlugin) await ensureDynsecFile(files.dynsecFile);
  await writeFileAtomic(files.config, renderMosquittoConf(opts, files), 0o644);
  return files;
}
