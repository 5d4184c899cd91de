/**
 * config: the committed SPIRE server config, the agent's plugins.yaml and the generated
 * mosquitto.conf parse, and agree with each other and with the layout.
 *
 * Hardening findings (insecure bootstrap, join_token attestation, sqlite datastore, anonymous
 * listeners, a plain listener on a public address) are expected on a dev stack. They are `info`
 * lines (shown with --verbose) by default, so a healthy `devenv` stack is all ✓; with
 * `--production` they turn the check into a warning.
 */
import { dirname, isAbsolute, resolve } from "node:path";
import { type AgentConfig, agentConfigFromText } from "../../agent/config.ts";
import { ConfigError, errorMessage } from "../../cli/errors.ts";
import { brokerSpiffeId } from "../../fleet/mod.ts";
import {
  type Check,
  type CheckContext,
  type CheckResult,
  type DoctorContext,
  fail,
  ok,
  rel,
  warn,
} from "../check.ts";
import { attrString, block, HclError, parseHcl } from "../../spire/hcl.ts";
import {
  isLoopback,
  listenerOption,
  type MosquittoConf,
  MosquittoConfError,
  parseMosquittoConf,
} from "../../mqtt/mosquitto_conf.ts";
import { fsHangHint, hardeningVerdict } from "./common.ts";

const PRODUCTION_HINT =
  "see the guide's production checklist; run 'k8s4r doctor --production --verbose' for the list";

function hardened(
  ctx: DoctorContext,
  detail: string,
  notes: string[],
  info: string[] = [],
): CheckResult {
  const lines = [...notes.map((n) => `hardening: ${n}`), ...info];
  if (hardeningVerdict(ctx, notes) === "warn") {
    return warn(`${detail}; ${notes.length} production hardening issue(s)`, PRODUCTION_HINT, lines);
  }
  return ok(
    notes.length ? `${detail} (dev settings: ${notes.length} hardening notes)` : detail,
    lines,
  );
}

// --- SPIRE server config ----------------------------------------------------------------------

export interface ServerConf {
  trustDomain?: { value: string; line: number };
  bindPort?: { value: string; line: number };
  socketPath?: { value: string; line: number };
  datastore?: string;
  nodeAttestors: string[];
}

export async function readServerConf(ctx: DoctorContext): Promise<ServerConf> {
  return await ctx.memo("server.conf", async () => {
    const file = rel(ctx, ctx.layout.spireServerConfig);
    let text: string;
    try {
      text = await ctx.fs.readTextFile(ctx.layout.spireServerConfig);
    } catch {
      throw new Error(`${file}: cannot read the file`);
    }
    let root;
    try {
      root = parseHcl(text);
    } catch (err) {
      if (err instanceof HclError) {
        throw new Error(`${file}:${err.line}: ${err.message.replace(/^line \d+: /, "")}`);
      }
      throw err;
    }
    const server = block(root, "server");
    if (!server) throw new Error(`${file}: expected a 'server { ... }' block`);
    const plugins = block(root, "plugins");
    const ds = plugins && block(plugins, "DataStore");
    const dsData = ds && block(ds, "plugin_data");
    const dbType = dsData && attrString(dsData, "database_type")?.value;
    return {
      trustDomain: attrString(server, "trust_domain"),
      bindPort: attrString(server, "bind_port"),
      socketPath: attrString(server, "socket_path"),
      datastore: dbType,
      nodeAttestors: plugins?.blocks.filter((b) =>
        b.type === "NodeAttestor"
      ).map((b) => b.labels[0] ?? "") ?? [],
    };
  });
}

const serverConfCheck: Check = {
  id: "config.spire-server",
  group: "config",
  title: "SPIRE server config",
  timeout: { hint: (ctx) => fsHangHint(ctx, ctx.layout.spireServerConfig) },
  async run(ctx) {
    const file = rel(ctx, ctx.layout.spireServerConfig);
    let conf: ServerConf;
    try {
      conf = await readServerConf(ctx);
    } catch (err) {
      return fail(errorMessage(err), `fix ${file}, or restore it: git checkout -- ${file}`);
    }
    if (!conf.trustDomain) {
      return fail(
        `${file}: server.trust_domain is missing`,
        `add trust_domain = "${ctx.layout.trustDomain}" to the server block of ${file}`,
      );
    }
    const info = [
      `trust_domain ${conf.trustDomain.value}, bind_port ${
        conf.bindPort?.value ?? "(default 8081)"
      }`,
    ];
    const notes: string[] = [];
    if (conf.nodeAttestors.includes("join_token")) {
      notes.push(
        `${file}: NodeAttestor "join_token" (use x509pop, aws_iid or gcp_iit in production)`,
      );
    }
    if (conf.datastore === "sqlite3") {
      notes.push(`${file}: sqlite3 datastore (use PostgreSQL or MySQL for HA)`);
    }
    return hardened(ctx, `${file} parses (trust domain ${conf.trustDomain.value})`, notes, info);
  },
};

// --- plugins.yaml -------------------------------------------------------------------------------

/**
 * plugins.yaml as `k8s4r agent` reads it: the agent's own loader (`agentConfigFromText` in
 * src/agent/config.ts), with the file read through the doctor's fs and the flags devenv gives
 * every agent (`--robot-id`, `--config`). Whatever the agent refuses, this throws with the
 * agent's exact message (a ConfigError: `file:line: key: expected ...`).
 */
export interface PluginsYaml {
  config: AgentConfig;
  /** The line of a key set in the file, undefined when the agent uses its default. */
  line(key: string): number | undefined;
}

export async function readPluginsYaml(ctx: DoctorContext): Promise<PluginsYaml> {
  return await ctx.memo("plugins.yaml", async () => {
    const display = rel(ctx, ctx.layout.agentPluginsYaml);
    let text: string;
    try {
      text = await ctx.fs.readTextFile(ctx.layout.agentPluginsYaml);
    } catch (err) {
      // devenv starts every agent with --config: a missing file is the agent's "file not found".
      const missing = !(await ctx.fs.stat(ctx.layout.agentPluginsYaml).catch(() => undefined));
      throw new ConfigError(
        display,
        undefined,
        undefined,
        missing ? "file not found" : `cannot read: ${errorMessage(err)}`,
      );
    }
    const { config, values } = agentConfigFromText(text, {
      cwd: ctx.layout.root,
      env: ctx.env,
      flags: { robotId: ctx.options.robotId, config: display },
      file: ctx.layout.agentPluginsYaml,
      display,
    });
    return { config, line: (key) => values.get(key)?.line };
  });
}

/** The hint for a plugins.yaml the agent refuses. */
function pluginsHint(file: string, message: string): string {
  const unset = /environment variable ([A-Za-z_][A-Za-z0-9_]*) is not set/.exec(message)?.[1];
  if (unset) {
    return `export ${unset}=...   # in the agent's environment; or give it a default in ${file}: \${${unset}:-default}`;
  }
  if (/^agent: robot id/.test(message)) {
    return "k8s4r doctor --robot-id robot-001   # robot ids are lowercase letters, digits and '-'";
  }
  return `fix ${file} (k8s4r agent refuses it the same way and exits 2), or restore it: git checkout -- ${file}`;
}

const pluginsCheck: Check = {
  id: "config.agent-plugins",
  group: "config",
  title: "agent plugins.yaml",
  timeout: { hint: (ctx) => fsHangHint(ctx, ctx.layout.agentPluginsYaml) },
  async run(ctx) {
    const file = rel(ctx, ctx.layout.agentPluginsYaml);
    let y: PluginsYaml;
    try {
      y = await readPluginsYaml(ctx);
    } catch (err) {
      const msg = errorMessage(err);
      return fail(msg, pluginsHint(file, msg));
    }
    const c = y.config;
    // A literal token in a committed file is a leaked secret, dev stack or not. The agent takes
    // the file's value as it reads it (after ${VAR} interpolation): a value that is no variable
    // of the environment came from the file itself.
    const token = c.spire.joinToken;
    const tokenLine = y.line("spire.joinToken");
    if (
      tokenLine !== undefined && token && token !== ctx.env["SPIRE_JOIN_TOKEN"] &&
      !Object.values(ctx.env).includes(token)
    ) {
      return warn(
        `${file}:${tokenLine}: spire.joinToken holds a literal token`,
        `replace it with joinToken: "\${SPIRE_JOIN_TOKEN:-}" and pass the token through the environment or joinTokenFile`,
      );
    }
    const info = [
      `spire: socket ${c.spire.socketPath}, server ${c.spire.serverHost}:${c.spire.serverPort}, trust bundle ${
        rel(ctx, c.spire.trustBundlePath)
      }, manage ${c.spire.manage}`,
      `mqtt: ${c.mqtt.brokerUrl}, broker ${c.mqtt.brokerSpiffeId}, heartbeat ${c.mqtt.heartbeatSeconds}s`,
      `tasks.allow: ${
        c.tasks.allow.length ? c.tasks.allow.join(", ") : "(none: every task is refused)"
      }`,
    ];
    const notes: string[] = [];
    if (c.tasks.allow.includes("*")) {
      notes.push(`${file}:${y.line("tasks.allow")}: tasks.allow ["*"] lets a task run any program`);
    }
    return hardened(
      ctx,
      `${file} is accepted by the agent (socket ${c.spire.socketPath})`,
      notes,
      info,
    );
  },
};

// --- cross-file consistency ---------------------------------------------------------------------

const consistencyCheck: Check = {
  id: "config.consistency",
  group: "config",
  title: "trust domain and socket paths agree",
  timeout: { hint: (ctx) => fsHangHint(ctx, dirname(ctx.layout.agentPluginsYaml)) },
  dependsOn: ["config.spire-server", "config.agent-plugins"],
  async run(ctx) {
    const conf = await readServerConf(ctx);
    const y = await readPluginsYaml(ctx);
    const sf = rel(ctx, ctx.layout.spireServerConfig);
    const pf = rel(ctx, ctx.layout.agentPluginsYaml);
    const td = ctx.layout.trustDomain;
    const where = (line: number | undefined) => `${pf}:${line ?? "(default)"}`;
    const tds: [string, string | undefined][] = [
      [`${sf}:${conf.trustDomain?.line}`, conf.trustDomain?.value],
      [where(y.line("spire.trustDomain")), y.config.spire.trustDomain],
    ];
    const bad = tds.filter(([, v]) => v !== td);
    if (bad.length) {
      return fail(
        `trust domain differs: layout ${td}, ${bad.map(([w, v]) => `${w} ${v}`).join(", ")}`,
        `use "${td}" everywhere (or set K8S4R_TRUST_DOMAIN to the configured one)`,
      );
    }
    if (y.config.mqtt.brokerSpiffeId !== brokerSpiffeId(td)) {
      return fail(
        `${
          where(y.line("mqtt.brokerSpiffeId"))
        }: mqtt.brokerSpiffeId is ${y.config.mqtt.brokerSpiffeId}, expected ${brokerSpiffeId(td)}`,
        `set mqtt.brokerSpiffeId: "${brokerSpiffeId(td)}" in ${pf}`,
      );
    }
    const info: string[] = [];
    if (conf.socketPath) {
      const p = isAbsolute(conf.socketPath.value)
        ? conf.socketPath.value
        : resolve(ctx.layout.root, conf.socketPath.value);
      if (p !== ctx.layout.spireServerSocket) {
        return warn(
          `${sf}:${conf.socketPath.line}: socket_path ${conf.socketPath.value} is not ${
            rel(ctx, ctx.layout.spireServerSocket)
          }, where k8s4r looks`,
          `set socket_path = "./${rel(ctx, ctx.layout.spireServerSocket)}" in ${sf}`,
        );
      }
    }
    // plugins.yaml describes robot-001's agent; other robots and K8S4R_AGENT_SOCKET_DIR override it.
    const yamlSocket = y.config.spire.socketPath;
    if (ctx.options.robotId === "robot-001" && !ctx.env["K8S4R_AGENT_SOCKET_DIR"]) {
      if (yamlSocket !== ctx.robot.agentSocket) {
        return warn(
          `${
            where(y.line("spire.socketPath"))
          }: spire.socketPath ${yamlSocket} is not ${ctx.robot.agentSocket}, where devenv starts robot-001's agent`,
          `set spire.socketPath: "${ctx.robot.agentSocket}" in ${pf}`,
        );
      }
    } else {
      info.push(
        `${ctx.options.robotId} uses ${ctx.robot.agentSocket} (plugins.yaml says ${yamlSocket})`,
      );
    }
    return ok(
      `trust domain ${td}; sockets ${
        rel(ctx, ctx.layout.spireServerSocket)
      }, ${ctx.robot.agentSocket}`,
      info,
    );
  },
};

// --- generated mosquitto.conf -------------------------------------------------------------------

export function mosquittoConfPath(ctx: DoctorContext): string {
  return `${ctx.layout.mosquittoDir}/mosquitto.conf`;
}

export async function readMosquittoConf(ctx: DoctorContext): Promise<MosquittoConf> {
  return await ctx.memo("mosquitto.conf", async () => {
    const path = mosquittoConfPath(ctx);
    let text: string;
    try {
      text = await ctx.fs.readTextFile(path);
    } catch {
      throw new Error(`${rel(ctx, path)}: not generated yet`);
    }
    try {
      return parseMosquittoConf(text);
    } catch (err) {
      if (err instanceof MosquittoConfError) {
        throw new Error(`${rel(ctx, path)}:${err.line}: ${err.message.replace(/^line \d+: /, "")}`);
      }
      throw err;
    }
  });
}

const mosquittoConfCheck: Check = {
  id: "config.mosquitto",
  group: "config",
  title: "generated mosquitto.conf",
  timeout: { hint: (ctx) => fsHangHint(ctx, mosquittoConfPath(ctx)) },
  async run(ctx: CheckContext) {
    const file = rel(ctx, mosquittoConfPath(ctx));
    let conf: MosquittoConf;
    try {
      conf = await readMosquittoConf(ctx);
    } catch (err) {
      return fail(errorMessage(err), "k8s4r devenv start   # generates the broker config");
    }
    const { mqttTls, mqttPlain } = ctx.layout.ports;
    const tlsL = conf.listeners.find((l) => l.port === mqttTls);
    if (!tlsL) {
      return fail(
        `${file}: no listener on ${mqttTls}`,
        "k8s4r devenv stop && k8s4r devenv start   # regenerates it",
      );
    }
    const opt = (k: string) => listenerOption(conf, tlsL, k)?.value;
    if (opt("require_certificate") !== "true") {
      return fail(
        `${file}:${tlsL.line}: listener ${mqttTls} does not set require_certificate true`,
        "k8s4r devenv stop && k8s4r devenv start   # regenerates it",
      );
    }
    // Per listener only: a global use_username_as_clientid does not reach a listener block.
    if (tlsL.options.get("use_username_as_clientid")?.value !== "true") {
      return fail(
        `${file}:${tlsL.line}: listener ${mqttTls} does not set use_username_as_clientid true: any robot certificate can connect with the fleet server's client id (or another robot's) and take its session over`,
        "k8s4r devenv stop && k8s4r devenv start   # regenerates it",
      );
    }
    const cafile = opt("cafile");
    if (cafile && resolve(ctx.layout.root, cafile) !== ctx.layout.caBundleFile) {
      return fail(
        `${file}: cafile ${cafile} is not the exported bundle ${rel(ctx, ctx.layout.caBundleFile)}`,
        "k8s4r devenv stop && k8s4r devenv start   # regenerates it",
      );
    }
    for (const k of ["cafile", "certfile", "keyfile"]) {
      if (!opt(k)) {
        return fail(
          `${file}: listener ${mqttTls} has no ${k}`,
          "k8s4r devenv stop && k8s4r devenv start",
        );
      }
    }
    const notes: string[] = [];
    for (const l of conf.listeners) {
      if (listenerOption(conf, l, "allow_anonymous")?.value === "true") {
        notes.push(`${file}:${l.line}: listener ${l.port} allows anonymous clients`);
      }
    }
    if (!conf.global.get("plugin") && !conf.global.get("auth_plugin")) {
      notes.push(
        `${file}: no dynamic-security plugin: k8s4r robot remove cannot cut a robot off the broker before its SVID expires`,
      );
    }
    const pls = conf.global.get("per_listener_settings");
    if (pls?.value === "true") {
      notes.push(
        `${file}:${pls.line}: per_listener_settings true: Mosquitto 2.0.21 drops the messages queued for an offline persistent session (the fleet server's) with it`,
      );
    }
    const plain = conf.listeners.find((l) => l.port === mqttPlain);
    if (plain && !isLoopback(plain.address ?? plain.options.get("bind_address")?.value)) {
      notes.push(
        `${file}:${plain.line}: plain listener ${mqttPlain} is bound to ${
          plain.address ?? "all interfaces"
        }, not loopback`,
      );
    }
    const info = conf.listeners.map((l) =>
      `listener ${l.port} ${l.address ?? "*"} (line ${l.line})`
    );
    return hardened(
      ctx,
      `${file} parses (${conf.listeners.length} listeners, ${mqttTls} requires a certificate)`,
      notes,
      info,
    );
  },
};

export const configChecks: Check[] = [
  serverConfCheck,
  pluginsCheck,
  consistencyCheck,
  mosquittoConfCheck,
];
