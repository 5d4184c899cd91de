/**
 * Mosquitto's dynamic-security plugin (Debian ships it with the broker), as k8s4r uses it: a
 * list of REMOVED robots that the broker refuses everything and disconnects at once. Robots are
 * not registered here; the ACL file's patterns grant each certificate CN its own subtree
 * (broker_config.ts). What the plugin does, read in plugins/dynamic-security/acl.c and
 * plugin_public.c (2.0.11 and 2.0.21 alike) and checked against the real brokers
 * (tests/broker_cutoff_test.ts):
 *
 * - It is consulted before the ACL file. For a username it does not know it defers (the ACL
 *   file decides); for a known client whose roles match it allows or denies, and a denial is
 *   final. A known client whose roles do not match also defers, so a removed robot gets a role,
 *   `k8s4r-removed`, that explicitly denies every topic for publish, receive, subscribe and
 *   unsubscribe.
 * - For certificate clients (`use_identity_as_username`) Mosquitto never calls the plugin's
 *   authentication: `disableClient` does not keep them out, and nothing in Mosquitto 2.0 can
 *   refuse their CONNECT short of a CRL signed by the CA that issued their certificate (SPIRE's,
 *   not ours). A removed robot whose SVID is still valid therefore still completes TLS and
 *   CONNECT (CONNACK 0), and then every PUBLISH is refused (PUBACK 0x87 at QoS 1), every
 *   SUBSCRIBE too (SUBACK 0x87), nothing is delivered to it, and its will is never published,
 *   until its SVID expires and the TLS handshake fails (SPIRE issues it no new one).
 * - `disableClient`, `addClientRole` and `deleteClient` disconnect every session of that
 *   username at once (MQTT 5 DISCONNECT 0x98 "administrative action"), without its will.
 *
 * Requests go to `$CONTROL/dynamic-security/v1` on the loopback password listener, as the
 * control host's admin login; answers come on `.../v1/response`.
 */
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { dirname, join } from "node:path";
import { CliError, errorMessage } from "../cli/errors.ts";
import { writeFileAtomic } from "../fs/atomic.ts";

export const DYNSEC_CONTROL_TOPICS = "$CONTROL/dynamic-security/#";
export const DYNSEC_REQUEST_TOPIC = "$CONTROL/dynamic-security/v1";
export const DYNSEC_RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response";
/** The role of a removed robot: every topic denied. */
export const REMOVED_ROLE = "k8s4r-removed";
/** The control host's admin username on the loopback listener (a reserved robot id). */
export const BROKER_ADMIN_USERNAME = "k8s4r-admin";

const DENY_ALL = ["publishClientSend", "publishClientReceive", "subscribePattern"]
  .flatMap((acltype) =>
    ["#", "$SYS/#", "$CONTROL/#"].map((topic) => ({ acltype, topic, priority: 0, allow: false }))
  )
  .concat([{ acltype: "unsubscribePattern", topic: "#", priority: 0, allow: false }]);

/** The plugin's state when k8s4r creates it: no client, the deny-all role, defaults all off. */
export function renderDynsecConfig(): string {
  return JSON.stringify(
    {
      // Off: a known client without a matching role defers to the ACL file.
      defaultACLAccess: {
        publishClientSend: false,
        publishClientReceive: false,
        subscribe: false,
        unsubscribe: false,
      },
      clients: [],
      groups: [],
      roles: [{ rolename: REMOVED_ROLE, textdescription: "k8s4r: removed robots", acls: DENY_ALL }],
    },
    null,
    2,
  ) + "\n";
}

/**
 * Creates the plugin's state file if it is missing. An existing one is the plugin's own (it
 * holds the removed robots): it is kept, after checking that it parses and has the deny role.
 */
export async function ensureDynsecFile(path: string): Promise<"created" | "kept"> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
    await writeFileAtomic(path, renderDynsecConfig(), 0o600);
    return "created";
  }
  let doc: { roles?: { rolename?: unknown; acls?: { allow?: unknown }[] }[] };
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new CliError(
      `${path}: expected the dynamic-security plugin's JSON state, got invalid JSON: ${
        errorMessage(err)
      }`,
      2,
      `move it away and run start again (removed robots are then allowed until removed again)`,
    );
  }
  const role = doc.roles?.find((r) => r.rolename === REMOVED_ROLE);
  if (!role || !role.acls?.length || role.acls.some((a) => a.allow !== false)) {
    throw new CliError(
      `${path}: roles: expected the role ${REMOVED_ROLE} denying every topic, got ${
        role ? "a role that allows something" : "none"
      }`,
      2,
      `move it away and run start again`,
    );
  }
  return "kept";
}

/** Where packages put the plugin. Debian: /usr/lib/<multiarch>/; the docker image: /usr/lib. */
export const DYNSEC_PLUGIN_PATHS = [
  "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
  "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
  "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
  "/usr/lib/mosquitto_dynamic_security.so",
  "/usr/local/lib/mosquitto_dynamic_security.so",
  "/opt/homebrew/lib/mosquitto_dynamic_security.so",
] as const;

/** The path of the docker image's plugin (eclipse-mosquitto:2.0). */
export const DOCKER_DYNSEC_PLUGIN = "/usr/lib/mosquitto_dynamic_security.so";

/**
 * The plugin for a native broker: `K8S4R_MOSQUITTO_DYNSEC` if set, else the first of
 * DYNSEC_PLUGIN_PATHS (and `../lib/` next to the binary) that exists; undefined when none does.
 */
export async function findDynsecPlugin(
  env: Record<string, string | undefined>,
  mosquittoPath?: string,
): Promise<string | undefined> {
  const set = env["K8S4R_MOSQUITTO_DYNSEC"];
  if (set) return set;
  const near = mosquittoPath
    ? [join(dirname(mosquittoPath), "..", "lib", "mosquitto_dynamic_security.so")]
    : [];
  for (const p of [...DYNSEC_PLUGIN_PATHS, ...near]) {
    try {
      if ((await Deno.stat(p)).isFile) return p;
    } catch { /* not here */ }
  }
  return undefined;
}

export interface DynsecLogin {
  host?: string;
  port: number;
  username: string;
  password: string;
  timeoutMs?: number;
}

export interface DynsecResponse {
  command: string;
  error?: string;
  data?: Record<string, unknown>;
}

/** A connection to the plugin's control topics. */
export class DynsecAdmin {
  #pending = new Map<string, (r: DynsecResponse) => void>();

  private constructor(private readonly client: MqttClient, private readonly timeoutMs: number) {
    client.on("message", (_topic, payload) => {
      let doc: { responses?: (DynsecResponse & { correlationData?: string })[] };
      try {
        doc = JSON.parse(new TextDecoder().decode(payload));
      } catch {
        return;
      }
      for (const r of doc.responses ?? []) {
        const done = r.correlationData ? this.#pending.get(r.correlationData) : undefined;
        if (done) {
          this.#pending.delete(r.correlationData!);
          done(r);
        }
      }
    });
  }

  static async connect(login: DynsecLogin): Promise<DynsecAdmin> {
    const timeoutMs = login.timeoutMs ?? 5000;
    const where = `${login.host ?? "127.0.0.1"}:${login.port}`;
    const client = mqtt.connect(`mqtt://${where}`, {
      username: login.username,
      password: login.password,
      clientId: `${login.username}-${crypto.randomUUID().slice(0, 8)}`,
      protocolVersion: 5,
      reconnectPeriod: 0,
      connectTimeout: timeoutMs,
      clean: true,
    });
    try {
      await new Promise<void>((resolve, reject) => {
        client.once("connect", () => resolve());
        client.once("error", reject);
        client.once("close", () => reject(new Error("connection closed")));
      });
      const granted = await client.subscribeAsync(DYNSEC_RESPONSE_TOPIC, { qos: 1 });
      if (!granted.length || granted[0].qos >= 0x80) {
        throw new Error(`subscribing to ${DYNSEC_RESPONSE_TOPIC} was refused`);
      }
    } catch (err) {
      client.end(true);
      throw new CliError(
        `the broker's admin login at ${where} failed: ${errorMessage(err)}`,
        1,
        "is the broker running (k8s4r devenv status)? the admin login is the control host's " +
          "broker-admin credentials file",
      );
    }
    return new DynsecAdmin(client, timeoutMs);
  }

  /** Sends commands in one request; resolves with their responses, in order. */
  async send(commands: Record<string, unknown>[]): Promise<DynsecResponse[]> {
    const waits = commands.map((c) => {
      const id = crypto.randomUUID();
      c.correlationData = id;
      return new Promise<DynsecResponse>((resolve, reject) => {
        const t = setTimeout(() => {
          this.#pending.delete(id);
          reject(
            new CliError(
              `the broker's dynamic-security plugin did not answer ${c.command} within ${this.timeoutMs} ms`,
              1,
              "is the plugin loaded? mosquitto.conf needs `plugin .../mosquitto_dynamic_security.so` (k8s4r writes it when it finds the plugin; K8S4R_MOSQUITTO_DYNSEC names it)",
            ),
          );
        }, this.timeoutMs);
        this.#pending.set(id, (r) => {
          clearTimeout(t);
          resolve(r);
        });
      });
    });
    await this.client.publishAsync(DYNSEC_REQUEST_TOPIC, JSON.stringify({ commands }), {
      qos: 1,
    });
    return await Promise.all(waits);
  }

  async close(): Promise<void> {
    await this.client.endAsync().catch(() => {});
  }
}

function check(r: DynsecResponse): void {
  if (r.error) {
    throw new CliError(`the broker refused ${r.command}: ${r.error}`);
  }
}

/**
 * Cuts a robot off the broker: its username gets the deny-all role (every later publish,
 * subscribe and delivery is refused) and every session it has is disconnected at once.
 * Idempotent.
 */
export async function cutOffUsername(admin: DynsecAdmin, username: string): Promise<void> {
  const [got] = await admin.send([{ command: "getClient", username }]);
  const roles = ((got.data?.client as { roles?: { rolename?: string }[] } | undefined)?.roles ??
    []).map((r) => r.rolename);
  const steps: Record<string, unknown>[] = [];
  if (got.error && /not found/i.test(got.error)) {
    steps.push({ command: "createClient", username, roles: [{ rolename: REMOVED_ROLE }] });
  } else {
    check(got);
    // Adding the role also disconnects every session of the username.
    if (!roles.includes(REMOVED_ROLE)) {
      steps.push({ command: "addClientRole", username, rolename: REMOVED_ROLE });
    }
  }
  // Disconnects every session of the username (createClient does not); keeps password logins
  // out too.
  steps.push({ command: "disableClient", username });
  for (const r of await admin.send(steps)) check(r);
}

/** Lifts a cut-off (the robot was added again). Idempotent. */
export async function restoreUsername(admin: DynsecAdmin, username: string): Promise<boolean> {
  const [r] = await admin.send([{ command: "deleteClient", username }]);
  if (r.error && /not found/i.test(r.error)) return false;
  check(r);
  return true;
}

/** The usernames that hold the deny-all role: the robots removed and not added again. */
export async function removedUsernames(admin: DynsecAdmin): Promise<string[]> {
  const [r] = await admin.send([{ command: "listClients", verbose: true }]);
  check(r);
  const clients = (r.data?.clients ?? []) as {
    username?: string;
    roles?: { rolename?: string }[];
  }[];
  return clients
    .filter((c) => c.roles?.some((x) => x.rolename === REMOVED_ROLE))
    .map((c) => String(c.username))
    .sort();
}
