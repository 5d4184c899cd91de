/** Helpers several checks share: the robot's SVID fetch, the mTLS handshake, log tails. */
import { Buffer } from "node:buffer";
import { devenvFiles } from "../../devenv/layout.ts";
import type { CheckContext, DoctorContext, FetchedSvid, TlsProbeResult } from "../check.ts";
import { derToPem } from "../pki.ts";

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

/** One mTLS handshake with the robot's SVID + MQTT CONNECT, shared by the broker checks. */
export function robotMtls(ctx: CheckContext): Promise<TlsProbeResult> {
  return ctx.memo("mtls", async () => {
    const svid = await robotSvid(ctx);
    const pem = svidPem(svid);
    return ctx.net.tlsProbe({
      host: "127.0.0.1",
      port: ctx.layout.ports.mqttTls,
      servername: "localhost",
      cert: pem.cert,
      key: pem.key,
      ca: pem.ca,
      timeoutMs: ctx.timeoutMs,
      mqttClientId: `k8s4r-doctor-${ctx.options.robotId}-${Date.now().toString(36)}`,
    });
  });
}

export function files(ctx: DoctorContext) {
  return devenvFiles(ctx.layout, ctx.env);
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
