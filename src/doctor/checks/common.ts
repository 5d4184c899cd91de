/** Helpers several checks share: the robot's SVID fetch, the mTLS handshake, log tails. */
import { Buffer } from "node:buffer";
import type { MqttProbeResult } from "../../mqtt/probe.ts";
import type { CheckContext, DoctorContext, FetchedSvid } from "../check.ts";
import { derToPem } from "../pki.ts";
import { rel } from "../check.ts";
import { CliError } from "../../cli/errors.ts";
import { secureSocketDir } from "../../spire/socket_dir.ts";

/** The Workload API answer for the doctor's own uid, fetched once per run. */
export function fetchSvids(ctx: CheckContext): Promise<FetchedSvid[]> {
  return ctx.memo("svids", () => ctx.spire.fetchX509Svids(ctx.robot.agentSocket, ctx.timeoutMs));
}

/** The robot's SVID among those returned; throws a readable message when it is missing. */
export async function robotSvid(ctx: CheckContext): Promise<FetchedSvid> {
  const svids = await fetchSvids(ctx);
  const mine = svids.find((s) => s.spiffeId === ctx.robot.spiffeId);
  if (!mine) {
    const got = svids.map((s) => s.spiffeId).join(", ") || "none";
    throw new Error(`no SVID for ${ctx.robot.spiffeId} (got: ${got})`);
  }
  return mine;
}

export function svidPem(svid: FetchedSvid): { cert: string; key: string; ca: string } {
  return {
    cert: svid.chain.map((d) => derToPem(d)).join(""),
    key: derToPem(svid.key, "PRIVATE KEY"),
    ca: svid.bundle.map((d) => derToPem(d)).join(""),
  };
}

/**
 * One mTLS handshake with the robot's SVID + an identify-only MQTT CONNECT (src/mqtt/probe.ts),
 * shared by the broker checks. Identify-only because the broker makes the certificate's CN the
 * client id: a normal CONNECT with robot-001's SVID would take the running agent's session over
 * (kick it, and with a clean start delete what is queued for it).
 */
export function robotMtls(ctx: CheckContext): Promise<MqttProbeResult> {
  return ctx.memo("mtls", async () => {
    const svid = await robotSvid(ctx);
    const pem = svidPem(svid);
    return ctx.net.mqttProbe({
      port: ctx.layout.ports.mqttTls,
      clientId: `k8s4r-doctor-${ctx.options.robotId}-${Date.now().toString(36)}`,
      identifyOnly: true,
      timeoutMs: ctx.timeoutMs,
      // The checks verify the broker themselves (bundle, SPIFFE ID, DNS name) and say which fails.
      tls: { ca: pem.ca, cert: pem.cert, key: pem.key, servername: "localhost", verify: false },
    });
  });
}

/**
 * What is wrong with a Workload API socket's directory, by the one rule the agent applies
 * (`secureSocketDir`, src/spire/socket_dir.ts: owned by this user or root, nobody else may
 * write, the same for every directory above it, symbolic links followed), or undefined.
 */
export async function socketDirProblem(
  ctx: CheckContext,
  socketPath: string,
): Promise<{ detail: string; hint: string } | undefined> {
  try {
    await secureSocketDir(socketPath, {
      create: false,
      uid: ctx.uid,
      fs: { lstat: (p) => ctx.fs.stat(p), realPath: (p) => ctx.fs.realPath(p) },
    });
    return undefined;
  } catch (err) {
    if (!(err instanceof CliError)) throw err;
    return { detail: err.message, hint: err.hint ?? "fix the socket directory" };
  }
}

export function files(ctx: DoctorContext) {
  return ctx.layout.files;
}

/** Last `n` non-empty lines of a text file, or undefined when it cannot be read. */
export async function tail(
  ctx: DoctorContext,
  path: string,
  n: number,
): Promise<string[] | undefined> {
  try {
    const text = await ctx.fs.readTextFile(path);
    return text.split("\n").filter((l) => l.trim()).slice(-n);
  } catch {
    return undefined;
  }
}

/** Hardening notes are warnings with --production and info lines otherwise. */
export function hardeningVerdict(ctx: DoctorContext, notes: string[]): "ok" | "warn" {
  return notes.length && ctx.options.production ? "warn" : "ok";
}

export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a).equals(Buffer.from(b));
}

/** `k8s4r` as the user typed it is unknown; hints use the task form that always works. */
export const K8S4R = "k8s4r";

// --- what a hang means, per kind of peer (the checks' timeout hints) ---------------------------

const RESTART_STACK = "k8s4r devenv stop && k8s4r devenv start";

/** A process that accepted the connection but never answered. */
export function mutePeerHint(what: string, where: string, proc: string): string {
  return `${what} accepted the connection on ${where} but never answered: it is stopped or hung. ` +
    `Look: k8s4r devenv status; ps -o pid,stat,args -C ${proc}   # stat T = stopped: kill -CONT <pid>; ` +
    `otherwise restart it: ${RESTART_STACK}`;
}

/** A file (or /proc) read that never finished. */
export function fsHangHint(ctx: DoctorContext, path: string): string {
  return `reading ${rel(ctx, path)} did not finish: the file system does not answer ` +
    `(a stale network mount, a full or failing disk): ls -l ${path}; dmesg | tail`;
}

/** A command the check runs that never returned. */
export function commandHangHint(command: string, why: string): string {
  return `${command} did not return: ${why}. Run it by hand to see where it waits: ${command}`;
}

/** The mosquitto process (native) or container (docker) that should answer on `port`. */
export function brokerHangHint(ctx: DoctorContext, port: number): string {
  if (ctx.options.broker === "docker") {
    return `the broker container accepted the connection on 127.0.0.1:${port} but never answered: ` +
      `it is paused or hung. Look: docker ps -a --filter name=${ctx.options.container}; ` +
      `docker logs --tail 50 ${ctx.options.container}; then: docker restart ${ctx.options.container}`;
  }
  return mutePeerHint("mosquitto", `127.0.0.1:${port}`, "mosquitto");
}
