/**
 * The broker component: choosing the runtime (native mosquitto or docker), generating its files,
 * starting it detached, probing it, and the two ways its identity changes reach it: SIGHUP for a
 * renewed certificate, a restart for a new trust bundle (Mosquitto 2.0 does not reload `cafile`).
 * `start` and the `broker-identity` component both use these, so the broker is always started
 * the same way.
 */
import { createPrivateKey } from "node:crypto";
import { dirname } from "node:path";
import { CliError, errorMessage } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { generatePassword, writeBrokerFiles } from "../mqtt/broker_config.ts";
import { type Daemon, isRecordAlive, readPidFile, stopPidFile } from "../process/mod.ts";
import { findMosquitto } from "../spire/binaries.ts";
import {
  type BrokerCommand,
  type BrokerMode,
  dockerBrokerCommand,
  dockerSighupArgv,
  nativeBrokerCommand,
} from "./broker_argv.ts";
import { type BrokerModeFlag, type DevenvContext, PROBE_INTERVAL_MS } from "./context.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
import { SERVER_MQTT_USERNAME } from "../fleet/mod.ts";
import { BROKER_ADMIN_USERNAME, DOCKER_DYNSEC_PLUGIN, findDynsecPlugin } from "../mqtt/dynsec.ts";
import { brokerTlsBinds } from "./layout.ts";
import { probeMqttPassword, probeMqttTls, type ProbeResult } from "./probes.ts";
import { parsePemCerts } from "../broker/identity.ts";

export interface BrokerRuntime {
  mode: BrokerMode;
  /** Native: the mosquitto binary. */
  mosquittoPath?: string;
  /** Human description: "mosquitto 2.0.11 (/usr/sbin/mosquitto)". */
  description: string;
}

/** `auto` tries native mosquitto first, then a docker engine. */
export async function resolveBrokerRuntime(io: Io, mode: BrokerModeFlag): Promise<BrokerRuntime> {
  const problems: string[] = [];
  if (mode === "native" || mode === "auto") {
    try {
      const m = await findMosquitto(io);
      return {
        mode: "native",
        mosquittoPath: m.path,
        description: `mosquitto ${m.version} (${m.path})`,
      };
    } catch (err) {
      if (mode === "native") throw err;
      problems.push(`native: ${errorMessage(err)}`);
    }
  }
  try {
    const r = await io.runner.output("docker", ["version", "--format", "{{.Server.Version}}"], {
      check: false,
      timeoutMs: 15_000,
    });
    if (r.success) return { mode: "docker", description: `docker engine ${r.stdout.trim()}` };
    problems.push(`docker: ${r.stderr.trim().split("\n").pop() || `exit ${r.code}`}`);
  } catch (err) {
    problems.push(`docker: ${errorMessage(err)}`);
  }
  throw new CliError(
    `no broker runtime: ${problems.join("; ")}`,
    1,
    "install mosquitto 2.x (apt-get install -y mosquitto) or start a docker engine",
  );
}

export function brokerCommand(ctx: DevenvContext, rt: BrokerRuntime): BrokerCommand {
  const input = {
    configFile: `${ctx.layout.mosquittoDir}/mosquitto.conf`,
    readOnlyDirs: [dirname(ctx.layout.caBundleFile)],
    // .dev-env holds the generated files, the persistence directory and the log file.
    writableDirs: [ctx.layout.devEnvDir],
    projectRoot: ctx.layout.root,
    uid: Deno.uid() ?? 0,
    gid: Deno.gid() ?? 0,
    mosquittoPath: rt.mosquittoPath,
  };
  return rt.mode === "native" ? nativeBrokerCommand(input) : dockerBrokerCommand(input);
}

export interface ServerCredentials {
  username: string;
  password: string;
}

/** The server's 1883 login: read it, or create it once (0600), so restarts keep it. */
export async function ensureServerCredentials(ctx: DevenvContext): Promise<ServerCredentials> {
  const file = ctx.layout.serverCredentialsFile;
  try {
    const c = JSON.parse(await Deno.readTextFile(file));
    if (typeof c?.username === "string" && typeof c?.password === "string" && c.password) {
      return { username: c.username, password: c.password };
    }
  } catch { /* create below */ }
  const creds = { username: SERVER_MQTT_USERNAME, password: generatePassword() };
  await writeFileAtomic(file, JSON.stringify(creds) + "\n", 0o600);
  return creds;
}

/**
 * The broker's dynamic-security admin login (`k8s4r robot remove` cuts robots off with it):
 * read it, or create it once (0600).
 */
export async function ensureAdminCredentials(ctx: DevenvContext): Promise<ServerCredentials> {
  const file = ctx.layout.brokerAdminCredentialsFile;
  try {
    const c = JSON.parse(await Deno.readTextFile(file));
    if (typeof c?.username === "string" && typeof c?.password === "string" && c.password) {
      return { username: c.username, password: c.password };
    }
  } catch { /* create below */ }
  const creds = { username: BROKER_ADMIN_USERNAME, password: generatePassword() };
  await writeFileAtomic(file, JSON.stringify(creds) + "\n", 0o600);
  return creds;
}

/**
 * Generates mosquitto.conf, the ACL and the password file (from the stored credentials), and
 * the dynamic-security plugin's state if it is missing. Native: the plugin next to the
 * installed mosquitto; docker: the image's.
 */
export async function writeBrokerConfig(ctx: DevenvContext, rt: BrokerRuntime): Promise<void> {
  const [creds, admin] = [await ensureServerCredentials(ctx), await ensureAdminCredentials(ctx)];
  const dynsecPlugin = rt.mode === "docker"
    ? DOCKER_DYNSEC_PLUGIN
    : await findDynsecPlugin(ctx.env, rt.mosquittoPath);
  if (!dynsecPlugin) {
    ctx.io.stderr.write(
      "  warning: mosquitto_dynamic_security.so not found: `k8s4r robot remove` cannot cut robots off the broker (set K8S4R_MOSQUITTO_DYNSEC)\n",
    );
  }
  await writeBrokerFiles(ctx.layout.mosquittoDir, {
    tlsPort: ctx.layout.ports.mqttTls,
    tlsBind: brokerTlsBinds(ctx.layout),
    plainPort: ctx.layout.ports.mqttPlain,
    cafile: ctx.layout.caBundleFile,
    certfile: ctx.files.brokerCertFile,
    keyfile: ctx.files.brokerKeyFile,
    server: creds,
    admin,
    dynsecPlugin,
    logFile: ctx.files.mosquittoLog,
  });
}

/**
 * Healthy = an MQTT session is accepted on both listeners: the server's password login on the
 * loopback listener, and an mTLS session on the robot listener (client certificate: the
 * broker's own SVID, which any SVID of the trust domain would equally prove).
 */
export async function probeBroker(ctx: DevenvContext): Promise<ProbeResult> {
  let creds: ServerCredentials;
  let ca: string, cert: string, key: string;
  try {
    creds = JSON.parse(await Deno.readTextFile(ctx.layout.serverCredentialsFile));
    ca = await Deno.readTextFile(ctx.layout.caBundleFile);
    cert = await Deno.readTextFile(ctx.files.brokerCertFile);
    key = await Deno.readTextFile(ctx.files.brokerKeyFile);
  } catch (err) {
    return { ok: false, detail: `missing broker files: ${errorMessage(err)}` };
  }
  const [plain, tls] = await Promise.all([
    probeMqttPassword(ctx.layout.ports.mqttPlain, creds.username, creds.password),
    probeMqttTls({ port: ctx.layout.ports.mqttTls, ca, cert, key }),
  ]);
  if (!plain.ok) return plain;
  if (!tls.ok) return tls;
  return { ok: true, detail: "mTLS and password sessions accepted" };
}

/**
 * Whether the broker's certificate files on disk can serve right now: a key that matches the
 * certificate, a chain that links up to a CA of the exported bundle, and at least a minute of
 * validity left. After a `stop` this lets the broker start again at once, before SPIRE and
 * broker-identity are back (broker-identity then writes a fresh SVID and sends SIGHUP).
 */
export async function brokerFilesUsable(
  ctx: DevenvContext,
  now = Date.now(),
): Promise<ProbeResult> {
  try {
    const chain = parsePemCerts(await Deno.readTextFile(ctx.files.brokerCertFile));
    const cas = parsePemCerts(await Deno.readTextFile(ctx.layout.caBundleFile));
    const key = createPrivateKey(await Deno.readTextFile(ctx.files.brokerKeyFile));
    if (chain.length === 0) return { ok: false, detail: "no certificate in the cert file" };
    const leaf = chain[0];
    if (!leaf.checkPrivateKey(key)) return { ok: false, detail: "key does not match the cert" };
    if (Date.parse(leaf.validTo) - now < 60_000) {
      return { ok: false, detail: `certificate expires ${leaf.validTo}` };
    }
    for (let i = 0; i + 1 < chain.length; i++) {
      if (!chain[i].checkIssued(chain[i + 1]) || !chain[i].verify(chain[i + 1].publicKey)) {
        return { ok: false, detail: "the certificate chain does not link up" };
      }
    }
    const top = chain[chain.length - 1];
    if (!cas.some((ca) => top.checkIssued(ca) && top.verify(ca.publicKey))) {
      return { ok: false, detail: "the certificate is not issued by the exported bundle" };
    }
    return { ok: true, detail: `certificate valid until ${leaf.validTo}` };
  } catch (err) {
    return { ok: false, detail: errorMessage(err) };
  }
}

/** Starts the broker detached with the given command; resolves once it is healthy. */
export async function startBroker(ctx: DevenvContext, cmd: BrokerCommand): Promise<Daemon> {
  return await ctx.io.runner.spawn({
    name: "mosquitto",
    cmd: cmd.cmd,
    args: cmd.args,
    cwd: ctx.layout.root,
    logFile: ctx.files.mosquittoLog,
    pidFile: ctx.files.mosquittoPid,
    detached: true,
    ready: async () => (await probeBroker(ctx)).ok,
    readyTimeoutMs: cmd.mode === "docker" ? 120_000 : 20_000,
    readyIntervalMs: PROBE_INTERVAL_MS,
  });
}

/** The broker's command as `start` recorded it. */
export function savedBrokerCommand(ctx: DevenvContext): BrokerCommand | undefined {
  try {
    const s = JSON.parse(Deno.readTextFileSync(ctx.files.brokerStateFile));
    if (typeof s?.cmd === "string" && Array.isArray(s?.args)) return s as BrokerCommand;
  } catch { /* none */ }
  return undefined;
}

export async function saveBrokerCommand(ctx: DevenvContext, cmd: BrokerCommand): Promise<void> {
  await writeFileAtomic(ctx.files.brokerStateFile, JSON.stringify(cmd, null, 2) + "\n", 0o600);
}

/**
 * SIGHUP makes mosquitto reload its certificate and key. Only the process of our pid file,
 * checked by start time; in docker mode, through the engine. Returns what it did.
 */
export async function reloadBroker(ctx: DevenvContext): Promise<string> {
  const rec = readPidFile(ctx.files.mosquittoPid);
  if (!rec || !isRecordAlive(rec)) return "broker not running";
  const cmd = savedBrokerCommand(ctx);
  if (cmd?.mode === "docker" && cmd.container) {
    await ctx.io.runner.output(cmd.cmd, dockerSighupArgv(cmd.container), { timeoutMs: 15_000 });
    return `SIGHUP sent to container ${cmd.container}`;
  }
  Deno.kill(rec.pid, "SIGHUP");
  return `SIGHUP sent to mosquitto (pid ${rec.pid})`;
}

/**
 * Runs `fn` holding an exclusive lock on the broker's lifecycle, so that `devenv start` and the
 * broker-identity watchdog never start two brokers on the same ports.
 */
export async function withBrokerLock<T>(ctx: DevenvContext, fn: () => Promise<T>): Promise<T> {
  await Deno.mkdir(dirname(ctx.files.mosquittoPid), { recursive: true });
  const lock = await Deno.open(`${ctx.files.mosquittoPid}.lock`, {
    create: true,
    write: true,
    mode: 0o600,
  });
  try {
    await lock.lock(true);
    return await fn();
  } finally {
    lock.close(); // closing releases the lock
  }
}

/** Stops the broker (pid file) and starts it again with its recorded command. */
export function restartBroker(ctx: DevenvContext): Promise<string> {
  return withBrokerLock(ctx, async () => {
    const rec = readPidFile(ctx.files.mosquittoPid);
    if (!rec || !isRecordAlive(rec)) return "broker not running";
    const cmd = savedBrokerCommand(ctx);
    if (!cmd) return "broker command unknown; not restarted";
    await stopPidFile(ctx.files.mosquittoPid, 10_000);
    const d = await startBroker(ctx, cmd);
    return `broker restarted (pid ${rec.pid} -> ${d.pid})`;
  });
}

/**
 * Starts the broker again if it died (crash, kill -9): its pid file names a process that is
 * gone. A broker that `devenv stop` stopped has no pid file and stays stopped. Returns what it
 * did, or undefined when nothing was needed.
 */
export function reviveBroker(ctx: DevenvContext): Promise<string | undefined> {
  return withBrokerLock(ctx, async () => {
    const rec = readPidFile(ctx.files.mosquittoPid);
    if (!rec || isRecordAlive(rec)) return undefined;
    const cmd = savedBrokerCommand(ctx);
    if (!cmd) return undefined;
    const d = await startBroker(ctx, cmd);
    return `broker pid ${rec.pid} had died; restarted it (pid ${d.pid})`;
  });
}
