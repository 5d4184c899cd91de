/**
 * `devenv start`: brings the whole stack up, idempotently. Each component is checked first: a
 * healthy one is left alone, a dead or unhealthy one is (re)started, and every start waits on
 * the component's real readiness probe. Everything is started detached (its own session), with
 * a pid file and a log in `.dev-env/`, so closing the terminal does not stop the stack.
 */
import { hostname } from "node:os";
import { dirname } from "node:path";
import { CliError, errorMessage } from "../cli/errors.ts";
import { colorEnabled } from "../cli/io.ts";
import {
  type Daemon,
  isRecordAlive,
  readPidFile,
  stopPidFile,
  tailFile,
  waitFor,
} from "../process/mod.ts";
import { ensureSpireBinaries } from "../spire/binaries.ts";
import { isAttested } from "../spire/agent.ts";
import { SpireServerCli } from "../spire/server.ts";
import {
  brokerCommand,
  probeBroker,
  resolveBrokerRuntime,
  saveBrokerCommand,
  savedBrokerCommand,
  startBroker,
  withBrokerLock,
  writeBrokerConfig,
} from "./broker.ts";
import { pemFingerprint, readBrokerIdentityStatus } from "./broker_identity.ts";
import {
  type BrokerModeFlag,
  type DevenvContext,
  readState,
  robotLayouts,
  selfCommand,
  writeFileAtomic,
  writeState,
} from "./context.ts";
import { brokerSpiffeId } from "../fleet/mod.ts";
import type { RobotLayout } from "./layout.ts";
import { httpGetJson, type ProbeResult } from "./probes.ts";
import { Progress, renderTable } from "./render.ts";
import { collectStatus } from "./status.ts";
import { agentV8FlagsEnv } from "../agent/runtime_flags.ts";

export interface StartOptions {
  robots: string[];
  broker: BrokerModeFlag;
  /** Robot SVID TTL (seconds) on their registration entries; undefined = server default. */
  svidTtl?: number;
  brokerSvidTtl?: number;
  /** SPIRE CA TTL (seconds) for a server this start launches; undefined = config file's. */
  caTtl?: number;
  /** The URL agents connect to (MQTT_BROKER_URL); default `ssl://localhost:<tls port>`. */
  brokerUrl?: string;
  /** Join token lifetime. */
  tokenTtlSeconds?: number;
  /** How long to wait for all robots to be online. */
  onlineTimeoutMs?: number;
}

type Outcome = { text: string; pid?: number };

/** The common "leave healthy alone, restart the rest" logic. */
async function ensureDaemon(
  name: string,
  pidFile: string,
  probe: () => Promise<ProbeResult>,
  start: () => Promise<Daemon>,
  graceMs = 10_000,
): Promise<Outcome> {
  const rec = readPidFile(pidFile);
  let why = "";
  if (rec && isRecordAlive(rec)) {
    // Give a component that is still coming up a moment to pass its probe before replacing it.
    let last: ProbeResult = { ok: false, detail: "" };
    try {
      await waitFor(async () => (last = await probe()).ok, {
        timeoutMs: graceMs,
        intervalMs: 200,
        what: `${name} to be healthy`,
      });
      return { text: `already running (pid ${rec.pid})`, pid: rec.pid };
    } catch {
      why = `unhealthy (${last.detail}), `;
      await stopPidFile(pidFile, 10_000);
    }
  } else if (rec) {
    why = `pid ${rec.pid} was gone, `;
  }
  const d = await start();
  return { text: `${why}${why ? "restarted" : "started"} (pid ${d.pid})`, pid: d.pid };
}

export async function devenvStart(ctx: DevenvContext, opts: StartOptions): Promise<number> {
  const { io, layout, files } = ctx;
  const color = colorEnabled(io);
  const progress = new Progress(io.stdout, color, color);
  const say = (s: string) => io.stdout.write(s + "\n");
  say(
    `Starting the k8s4r dev stack in ${layout.root} (robots: ${opts.robots.join(", ")})`,
  );
  await Deno.mkdir(layout.devEnvDir, { recursive: true, mode: 0o700 });
  await Deno.chmod(layout.devEnvDir, 0o700);
  await Deno.mkdir(files.tokensDir, { recursive: true, mode: 0o700 });
  await Deno.chmod(files.tokensDir, 0o700);

  const prev = readState(ctx);
  const robots = robotLayouts(ctx, opts.robots);
  const createdSocketDirs = new Set(prev?.createdSocketDirs ?? []);
  for (const sock of [...robots.map((r) => r.agentSocket), files.brokerAgentSocket]) {
    const dir = dirname(sock);
    try {
      await Deno.stat(dir);
    } catch {
      await Deno.mkdir(dir, { recursive: true, mode: 0o755 });
      createdSocketDirs.add(dir);
    }
  }
  const allRobots = [...new Set([...(prev?.robots ?? []), ...opts.robots])];
  await writeState(ctx, {
    robots: allRobots,
    broker: prev?.broker,
    createdSocketDirs: [...createdSocketDirs],
    env: ctx.layoutEnv,
  });
  const self = selfCommand();
  const childEnv = { ...ctx.layoutEnv, NO_COLOR: "1" };
  const uid = Deno.uid() ?? 0;
  let ok = false;
  try {
    // 1. Binaries and the broker runtime.
    let bins!: { server: string; agent: string };
    let runtime!: Awaited<ReturnType<typeof resolveBrokerRuntime>>;
    await progress.step("provision", async () => {
      bins = await ensureSpireBinaries(io, (l) => io.stderr.write(`  ${l}\n`));
      const saved = savedBrokerCommand(ctx);
      const brokerAlive = isRecordAlive(readPidFile(files.mosquittoPid));
      // A running broker keeps its mode; otherwise resolve --broker now.
      const mode: BrokerModeFlag = brokerAlive && saved ? saved.mode : opts.broker;
      runtime = await resolveBrokerRuntime(io, mode);
      return `spire ${bins.server}; broker ${runtime.description}`;
    });

    // 2. SPIRE server.
    const cli = new SpireServerCli(io.runner, bins.server, layout.spireServerSocket);
    await progress.step("spire-server", async () => {
      const r = await ensureDaemon(
        "spire-server",
        files.spireServerPid,
        async () => ({ ok: await cli.healthy(), detail: "gRPC health check" }),
        // Detached through `devenv spire-server`, which redacts join tokens from SPIRE's log.
        () =>
          io.runner.spawn({
            name: "spire-server",
            cmd: self.cmd,
            args: [
              ...self.args,
              "devenv",
              "spire-server",
              "--project-dir",
              layout.root,
              ...(opts.caTtl !== undefined ? ["--ca-ttl", String(opts.caTtl)] : []),
            ],
            cwd: layout.root,
            env: childEnv,
            logFile: files.spireServerLog,
            pidFile: files.spireServerPid,
            detached: true,
            ready: () => cli.healthy(),
            readyTimeoutMs: 60_000,
            readyIntervalMs: 100,
          }),
      );
      return `${r.text}, 127.0.0.1:${layout.ports.spireServer}`;
    });

    // 3. Identities: join tokens for nodes that never attested, registration entries.
    await progress.step("identities", async () => {
      const tokenTtl = opts.tokenTtlSeconds ?? 600;
      let tokens = 0;
      const nodes: { nodeId: string; dataDir: string; tokenFile: string }[] = [
        ...robots.map((r) => ({
          nodeId: r.nodeSpiffeId,
          dataDir: r.agentDataDir,
          tokenFile: r.joinTokenFile,
        })),
        {
          nodeId: files.brokerNodeSpiffeId,
          dataDir: files.brokerAgentDataDir,
          tokenFile: files.brokerJoinTokenFile,
        },
      ];
      for (const n of nodes) {
        if (await isAttested(n.dataDir)) continue;
        const t = await cli.generateJoinToken(n.nodeId, tokenTtl);
        // The token goes only into this 0600 file (dir 0700); never argv, env or a log.
        await writeFileAtomic(n.tokenFile, t.value + "\n", 0o600, 0o700);
        tokens++;
      }
      const counts = { created: 0, updated: 0, unchanged: 0 };
      for (const r of robots) {
        counts[
          await cli.reconcileEntry({
            spiffeId: r.spiffeId,
            parentId: r.nodeSpiffeId,
            selectors: [`unix:uid:${uid}`],
            dnsNames: [r.robotId],
            x509SvidTtl: opts.svidTtl,
          })
        ]++;
      }
      const dns = ["localhost", hostname()].filter((v, i, a) => v && a.indexOf(v) === i);
      counts[
        await cli.reconcileEntry({
          spiffeId: brokerSpiffeId(layout.trustDomain),
          parentId: files.brokerNodeSpiffeId,
          selectors: [`unix:uid:${uid}`],
          dnsNames: dns,
          x509SvidTtl: opts.brokerSvidTtl,
        })
      ]++;
      return `${tokens} join token(s); entries: ${counts.created} created, ${counts.updated} updated, ${counts.unchanged} unchanged`;
    });

    // 4. Trust bundle export.
    let bundleChanged = false;
    await progress.step("trust bundle", async () => {
      const pem = await cli.bundlePem();
      let current: string | undefined;
      try {
        current = await Deno.readTextFile(layout.caBundleFile);
      } catch { /* first export */ }
      if (current !== undefined && pemFingerprint(current) === pemFingerprint(pem)) {
        return `unchanged (${layout.caBundleFile})`;
      }
      await writeFileAtomic(layout.caBundleFile, pem, 0o644, 0o755);
      bundleChanged = current !== undefined;
      return `exported to ${layout.caBundleFile}`;
    });

    // 5. broker-identity: the broker's SVID from its own SPIRE agent.
    await progress.step("broker-identity", async () => {
      const r = await ensureDaemon(
        "broker-identity",
        files.brokerIdentityPid,
        () => probeBrokerIdentity(ctx),
        () =>
          io.runner.spawn({
            name: "broker-identity",
            cmd: self.cmd,
            args: [...self.args, "devenv", "broker-identity", "--project-dir", layout.root],
            cwd: layout.root,
            env: childEnv,
            logFile: files.brokerIdentityLog,
            pidFile: files.brokerIdentityPid,
            detached: true,
            ready: async () => (await probeBrokerIdentity(ctx)).ok,
            readyTimeoutMs: 60_000,
            readyIntervalMs: 100,
          }),
      );
      const s = await readBrokerIdentityStatus(files.brokerIdentityStatus);
      return `${r.text}, SVID serial ${s?.serial ?? "?"} until ${s?.notAfter ?? "?"}`;
    });

    // 6. Mosquitto.
    await progress.step("mosquitto", async () => {
      const cmd = brokerCommand(ctx, runtime);
      // Under the broker lock: broker-identity's watchdog may be reviving a dead broker too.
      const r = await withBrokerLock(ctx, async () => {
        const rec = readPidFile(files.mosquittoPid);
        if (bundleChanged && rec && isRecordAlive(rec)) {
          // A new cafile needs a restart (Mosquitto 2.0 does not reload it on SIGHUP).
          await stopPidFile(files.mosquittoPid, 10_000);
        }
        return await ensureDaemon(
          "mosquitto",
          files.mosquittoPid,
          () => probeBroker(ctx),
          async () => {
            await writeBrokerConfig(ctx);
            await saveBrokerCommand(ctx, cmd);
            return await startBroker(ctx, cmd);
          },
        );
      });
      const st = readState(ctx);
      if (st) await writeState(ctx, { ...st, broker: savedBrokerCommand(ctx) });
      return `${r.text}, ${
        savedBrokerCommand(ctx)?.mode ?? cmd.mode
      }, mTLS 127.0.0.1:${layout.ports.mqttTls}, password 127.0.0.1:${layout.ports.mqttPlain}`;
    });

    // 7. The k8s4r server.
    const api = `http://127.0.0.1:${layout.ports.http}`;
    await progress.step("server", async () => {
      const r = await ensureDaemon(
        "server",
        files.serverPid,
        () => probeServer(api),
        () =>
          io.runner.spawn({
            name: "server",
            cmd: self.cmd,
            args: [
              ...self.args,
              "server",
              "--mqtt-credentials",
              layout.serverCredentialsFile,
              "--http-addr",
              `127.0.0.1:${layout.ports.http}`,
              "--data-dir",
              layout.serverDataDir,
              "--broker-url",
              `mqtt://127.0.0.1:${layout.ports.mqttPlain}`,
            ],
            cwd: layout.root,
            env: childEnv,
            logFile: files.serverLog,
            pidFile: files.serverPid,
            detached: true,
            ready: async () => (await probeServer(api)).ok,
            readyTimeoutMs: 60_000,
            readyIntervalMs: 100,
          }),
      );
      return `${r.text}, ${api}`;
    });

    // 8. The agents (each supervises its own spire-agent), then wait until all are online.
    const brokerUrl = opts.brokerUrl ?? `ssl://localhost:${layout.ports.mqttTls}`;
    const spawned = new Map<string, Daemon>();
    await progress.step(`agents`, async () => {
      const parts: string[] = [];
      for (const r of robots) {
        const rec = readPidFile(r.pidFile);
        if (rec && isRecordAlive(rec)) {
          parts.push(`${r.robotId} running (pid ${rec.pid})`);
          continue;
        }
        const d = await io.runner.spawn({
          name: `agent ${r.robotId}`,
          cmd: self.cmd,
          args: agentArgs(self.args, r, layout.agentPluginsYaml, brokerUrl),
          cwd: layout.root,
          env: { ...childEnv, DENO_V8_FLAGS: agentV8FlagsEnv(io.env.DENO_V8_FLAGS) },
          logFile: r.logFile,
          pidFile: r.pidFile,
          detached: true,
        });
        spawned.set(r.robotId, d);
        parts.push(`${r.robotId} ${rec ? "restarted" : "started"} (pid ${d.pid})`);
      }
      return parts.join(", ");
    });

    await progress.step("robots online", async () => {
      const pending = new Set(opts.robots);
      // waitFor treats a throwing probe as "not yet": a dead agent is reported through this.
      let dead: RobotLayout | undefined;
      try {
        await waitFor(async () => {
          for (const r of robots) {
            if (!pending.has(r.robotId)) continue;
            if (!isRecordAlive(readPidFile(r.pidFile))) {
              dead = r;
              return true;
            }
            if (await robotOnline(api, r.robotId)) pending.delete(r.robotId);
          }
          return pending.size === 0;
        }, {
          timeoutMs: opts.onlineTimeoutMs ?? 120_000,
          intervalMs: 200,
          signal: io.signal,
          what: "robots online at the server",
        });
      } catch (err) {
        const r = robots.find((x) => pending.has(x.robotId))!;
        throw new CliError(
          `${errorMessage(err)}: still offline: ${[...pending].join(", ")} (log: ${r.logFile}: ${
            lastLogLine(await tailFile(r.logFile, 5))
          })`,
        );
      }
      if (dead) {
        throw new CliError(
          `agent ${dead.robotId} exited (log: ${dead.logFile}): ${
            lastLogLine(await tailFile(dead.logFile, 5))
          }`,
        );
      }
      return `${opts.robots.length} online`;
    });
    ok = true;
  } catch (err) {
    if (err instanceof CliError && !err.hint && !io.signal.aborted) {
      throw new CliError(
        err.message,
        err.exitCode,
        "what started keeps running: see `k8s4r devenv status` and `k8s4r devenv logs`; " +
          "fix the cause and run start again, or `k8s4r devenv stop`",
      );
    }
    throw err;
  } finally {
    await writeFileAtomic(
      files.timingsFile,
      JSON.stringify(
        {
          startedAt: new Date(Date.now() - progress.elapsedMs()).toISOString(),
          ok,
          totalMs: Math.round(progress.elapsedMs()),
          steps: progress.steps.map((s) => ({ ...s, ms: Math.round(s.ms) })),
        },
        null,
        2,
      ) + "\n",
      0o644,
    ).catch(() => {});
  }
  const rows = await collectStatus(ctx);
  io.stdout.write("\n" + renderTable(rows, color));
  say(
    `\nStack ready in ${(progress.elapsedMs() / 1000).toFixed(1)}s. ` +
      "Logs: k8s4r devenv logs -f; stop: k8s4r devenv stop",
  );
  return 0;
}

function lastLogLine(text: string): string {
  return text.split("\n").filter((l) => l.trim()).pop() ?? "no output";
}

export function agentArgs(
  selfArgs: string[],
  r: RobotLayout,
  pluginsYaml: string,
  brokerUrl: string,
): string[] {
  return [
    ...selfArgs,
    "agent",
    "--robot-id",
    r.robotId,
    "--config",
    pluginsYaml,
    "--socket",
    r.agentSocket,
    "--data-dir",
    r.agentDataDir,
    "--join-token-file",
    r.joinTokenFile,
    "--broker-url",
    brokerUrl,
  ];
}

export async function probeServer(api: string): Promise<ProbeResult> {
  const r = await httpGetJson(`${api}/healthz`);
  return { ok: r.ok, detail: `GET /healthz: ${r.detail}` };
}

export async function robotOnline(api: string, robotId: string): Promise<boolean> {
  const r = await httpGetJson(`${api}/api/robots/${encodeURIComponent(robotId)}`);
  return r.ok && (r.body as { online?: unknown } | undefined)?.online === true;
}

/** Healthy = its status file names an unexpired SVID that is the one in the cert file. */
export async function probeBrokerIdentity(ctx: DevenvContext): Promise<ProbeResult> {
  const s = await readBrokerIdentityStatus(ctx.files.brokerIdentityStatus);
  if (!s) return { ok: false, detail: "no status yet" };
  const rec = readPidFile(ctx.files.brokerIdentityPid);
  if (!rec || rec.pid !== s.pid) {
    return { ok: false, detail: "status was written by another process" };
  }
  if (Date.parse(s.notAfter) <= Date.now()) {
    return { ok: false, detail: `SVID expired ${s.notAfter}` };
  }
  try {
    const { X509Certificate } = await import("node:crypto");
    const cert = new X509Certificate(await Deno.readTextFile(ctx.files.brokerCertFile));
    if (
      cert.serialNumber.toLowerCase().replace(/^0+/, "") !==
        s.serial.toLowerCase().replace(/^0+/, "")
    ) {
      return { ok: false, detail: "certificate file does not match the status" };
    }
  } catch (err) {
    return { ok: false, detail: `certificate file: ${errorMessage(err)}` };
  }
  return { ok: true, detail: `serial ${s.serial}, expires ${s.notAfter}` };
}
