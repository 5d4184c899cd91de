/**
 * `devenv status`: for each component, whether it runs (pid alive AND the very process devenv
 * started: the pid file's start time must match), whether it is healthy (its own probe), its
 * endpoint, and for the broker and the agents the SVID expiry; plus whether the exported trust
 * bundle equals SPIRE's current one.
 */
import { X509Certificate } from "node:crypto";
import { errorMessage } from "../cli/errors.ts";
import { colorEnabled } from "../cli/io.ts";
import { isRecordAlive, readPidFile } from "../process/mod.ts";
import { X509Source } from "../spiffe/mod.ts";
import { findSpireBinaries } from "../spire/binaries.ts";
import { SpireServerCli } from "../spire/server.ts";
import { probeBroker, savedBrokerCommand } from "./broker.ts";
import { pemFingerprint, readBrokerIdentityStatus } from "./broker_identity.ts";
import { type DevenvContext, knownRobots, robotLayouts } from "./context.ts";
import { type ComponentStatus, renderJson, renderTable } from "./render.ts";
import { probeBrokerIdentity, probeServer } from "./start.ts";
import { httpGetJson } from "./probes.ts";

export function agentComponentName(robotId: string): string {
  return robotId === "robot-001" ? "agent" : `agent-${robotId}`;
}

/** "2025-01-01T00:00:00.000Z (in 42m)". */
export function expiryText(notAfter: Date, now = Date.now()): string {
  const s = Math.round((notAfter.getTime() - now) / 1000);
  const rel = s <= 0
    ? "expired"
    : s < 120
    ? `in ${s}s`
    : s < 7200
    ? `in ${Math.round(s / 60)}m`
    : `in ${Math.round(s / 3600)}h`;
  return `${notAfter.toISOString()} (${rel})`;
}

function pidInfo(file: string): { running: boolean; pid: number | null } {
  const rec = readPidFile(file);
  const running = isRecordAlive(rec);
  return { running, pid: running ? rec!.pid : null };
}

async function agentSvidExpiry(socket: string, spiffeId: string): Promise<string> {
  const ac = new AbortController();
  let source: X509Source | undefined;
  try {
    source = await X509Source.create({
      address: `unix://${socket}`,
      spiffeId,
      timeoutMs: 3000,
      signal: ac.signal,
    });
    const svid = source.getX509Svid();
    return `SVID expires ${expiryText(svid.notAfter)}`;
  } catch (err) {
    return `SVID unavailable: ${errorMessage(err)}`;
  } finally {
    ac.abort();
    await Promise.resolve(source?.close()).catch(() => {});
  }
}

export async function collectStatus(ctx: DevenvContext): Promise<ComponentStatus[]> {
  const { layout, files } = ctx;
  const rows: ComponentStatus[] = [];

  // SPIRE server.
  const bins = await findSpireBinaries(ctx.io).catch(() => undefined);
  const spire = pidInfo(files.spireServerPid);
  const cli = bins
    ? new SpireServerCli(ctx.io.runner, bins.server, layout.spireServerSocket)
    : undefined;
  const spireHealthy = spire.running && !!cli && await cli.healthy();
  rows.push({
    name: "spire-server",
    ...spire,
    healthy: spireHealthy,
    endpoint: `127.0.0.1:${layout.ports.spireServer}`,
    detail: spire.running ? (spireHealthy ? "gRPC health SERVING" : "health check fails") : "",
  });

  // The exported CA: fresh when it equals SPIRE's current bundle.
  let bundleRow: ComponentStatus = {
    name: "ca-bundle",
    running: false,
    pid: null,
    healthy: false,
    endpoint: layout.caBundleFile,
    detail: "not exported",
  };
  try {
    const exported = pemFingerprint(await Deno.readTextFile(layout.caBundleFile));
    bundleRow = { ...bundleRow, running: exported !== undefined, detail: "exported" };
    if (spireHealthy && cli) {
      const current = pemFingerprint(await cli.bundlePem());
      bundleRow.healthy = exported !== undefined && exported === current;
      bundleRow.detail = bundleRow.healthy
        ? "fresh (equals SPIRE's bundle)"
        : "STALE: differs from SPIRE's bundle";
    } else {
      bundleRow.detail = "freshness unknown: SPIRE server down";
    }
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) bundleRow.detail = errorMessage(err);
  }
  rows.push(bundleRow);

  // broker-identity.
  const bi = pidInfo(files.brokerIdentityPid);
  const biProbe = bi.running ? await probeBrokerIdentity(ctx) : { ok: false, detail: "" };
  const biStatus = await readBrokerIdentityStatus(files.brokerIdentityStatus);
  rows.push({
    name: "broker-identity",
    ...bi,
    healthy: bi.running && biProbe.ok,
    endpoint: files.brokerAgentSocket,
    detail: bi.running
      ? biStatus
        ? `SVID ${biStatus.spiffeId} expires ${
          expiryText(new Date(biStatus.notAfter))
        }, last renewal ${biStatus.lastRenewal} (renewals: ${biStatus.renewals})${
          biStatus.lastError ? `; last error: ${biStatus.lastError}` : ""
        }`
        : biProbe.detail
      : "",
  });

  // Mosquitto.
  const mq = pidInfo(files.mosquittoPid);
  const mqProbe = mq.running ? await probeBroker(ctx) : { ok: false, detail: "" };
  let certDetail = "";
  try {
    const cert = new X509Certificate(await Deno.readTextFile(files.brokerCertFile));
    certDetail = `cert serial ${cert.serialNumber} expires ${expiryText(new Date(cert.validTo))}`;
  } catch { /* no cert yet */ }
  rows.push({
    name: "mosquitto",
    ...mq,
    healthy: mq.running && mqProbe.ok,
    endpoint:
      `mqtts://127.0.0.1:${layout.ports.mqttTls} mqtt://127.0.0.1:${layout.ports.mqttPlain}`,
    detail: mq.running
      ? [savedBrokerCommand(ctx)?.mode ?? "", mqProbe.ok ? "" : mqProbe.detail, certDetail]
        .filter(Boolean).join("; ")
      : "",
  });

  // The k8s4r server.
  const api = `http://127.0.0.1:${layout.ports.http}`;
  const sv = pidInfo(files.serverPid);
  const svProbe = sv.running ? await probeServer(api) : { ok: false, detail: "" };
  rows.push({
    name: "server",
    ...sv,
    healthy: sv.running && svProbe.ok,
    endpoint: api,
    detail: sv.running && !svProbe.ok ? svProbe.detail : "",
  });

  // Agents.
  for (const r of robotLayouts(ctx, knownRobots(ctx))) {
    const ag = pidInfo(r.pidFile);
    let online = false;
    let detail = "";
    if (ag.running) {
      const res = await httpGetJson(`${api}/api/robots/${encodeURIComponent(r.robotId)}`);
      online = res.ok && (res.body as { online?: unknown } | undefined)?.online === true;
      detail = [
        online ? "online" : `offline at the server (${res.detail})`,
        await agentSvidExpiry(r.agentSocket, r.spiffeId),
      ].join("; ");
    }
    rows.push({
      name: agentComponentName(r.robotId),
      ...ag,
      healthy: ag.running && online,
      endpoint: r.agentSocket,
      detail,
    });
  }
  return rows;
}

export async function devenvStatus(ctx: DevenvContext, json: boolean): Promise<number> {
  const rows = await collectStatus(ctx);
  ctx.io.stdout.write(json ? renderJson(rows) : renderTable(rows, colorEnabled(ctx.io)));
  return rows.every((r) => r.running && r.healthy) ? 0 : 1;
}
