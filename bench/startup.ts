/**
 * Startup: `devenv start` from cold (binaries cached, fresh project dir, fresh SPIRE data) until
 * the robot is online, and again after `devenv stop` (restart: agents attested, data kept), step
 * by step (`.dev-env/start-timings.json`); and, in the same run, each component's own readiness
 * when started alone and back to back:
 *
 *   SPIRE server healthy -> broker accepting (mTLS + password listeners) -> agent attested
 *   (Workload API serving) -> first SVID -> MQTT mTLS connection (CONNACK)
 *
 * Everything is done twice per run, side by side: with devenv's SPIRE settings
 * (`DEV_SPIRE_TIMING`) and with SPIRE's defaults (`devenv start --spire-defaults`). The ratio
 * devenv total / sum of the components alone (same settings, same run) shows what devenv adds.
 */
import { join } from "node:path";
import mqtt from "mqtt";
import { bufferIo } from "../src/cli/io.ts";
import { DEV_SPIRE_TIMING } from "../src/devenv/components.ts";
import { brokerSpiffeId, nodeSpiffeId, robotSpiffeId, TRUST_DOMAIN } from "../src/fleet/mod.ts";
import { probeMqttPassword, probeMqttTls } from "../src/devenv/probes.ts";
import { generatePassword, writeBrokerFiles } from "../src/mqtt/broker_config.ts";
import { realRunner } from "../src/process/mod.ts";
import { renderAgentConfig } from "../src/spire/agent.ts";
import { findSpireBinaries } from "../src/spire/binaries.ts";
import { grpcHealthCheck } from "../src/spire/health.ts";
import { SpireServerCli, startSpireServer } from "../src/spire/server.ts";
import { authorizeId, mtlsClientOptions } from "../src/spiffe/tls.ts";
import { X509Source } from "../src/spiffe/workload/x509_source.ts";
import { freePorts } from "../tests/helpers/ports.ts";
import { type BenchOptions, BenchStack, Cleanup, MAIN_TS, REPO } from "./lib.ts";
import { type BenchResult, figure } from "./report.ts";
import { median, round } from "./stats.ts";

const COMPONENTS = [
  ["spire_server", "SPIRE server healthy"],
  ["broker", "mosquitto accepting (mTLS + password)"],
  ["agent_attested", "SPIRE agent attested, Workload API serving"],
  ["first_svid", "first X.509 SVID at the workload"],
  ["mqtt_connect", "MQTT mTLS connection (CONNACK)"],
] as const;
type ComponentId = typeof COMPONENTS[number][0];

/** The two SPIRE settings compared side by side. */
export const SETTINGS = [
  {
    id: "dev",
    label: "devenv's SPIRE settings",
    flags: [] as string[],
    server: {
      cacheReloadInterval: DEV_SPIRE_TIMING.serverCacheReloadInterval,
      eventsBasedCache: DEV_SPIRE_TIMING.serverEventsBasedCache,
      attestationRateLimit: DEV_SPIRE_TIMING.serverAttestationRateLimit,
    },
    agentSyncInterval: DEV_SPIRE_TIMING.agentSyncInterval as string | undefined,
  },
  {
    id: "spire_defaults",
    label: "SPIRE defaults",
    flags: ["--spire-defaults"],
    server: {},
    agentSyncInterval: undefined,
  },
] as const;
type Settings = typeof SETTINGS[number];

/**
 * Starts each component alone, back to back, in a temp dir, with `settings`; returns each one's
 * readiness ms. Same order as devenv: the robot's token and entry exist before its agent starts
 * (the broker comes up in between, as in devenv).
 */
export async function componentTimes(settings: Settings): Promise<Record<ComponentId, number>> {
  const cleanup = new Cleanup();
  const io = bufferIo({ env: Deno.env.toObject() });
  const bins = await findSpireBinaries(io);
  if (!bins) throw new Error("SPIRE binaries not found (run k8s4r devenv install)");
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-bc-" });
  cleanup.add("dir", () => Deno.remove(dir, { recursive: true }));
  const [spirePort, plainPort, tlsPort] = freePorts(3);
  const out = {} as Record<ComponentId, number>;
  try {
    let t = performance.now();
    const srv = await startSpireServer(io, {
      bin: bins.server,
      configFile: join(REPO, "config", "spire", "server.conf"),
      cwd: dir,
      dataDir: join(dir, "srv"),
      socketPath: join(dir, "srv", "api.sock"),
      bindAddress: "127.0.0.1",
      port: spirePort,
      logFile: join(dir, "spire-server.log"),
      readyTimeoutMs: 60_000,
      ...settings.server,
    });
    out.spire_server = performance.now() - t;
    cleanup.add("spire-server", () => srv.stop(5000));
    const cli = new SpireServerCli(realRunner, bins.server, srv.socketPath);

    // Preparation, as devenv does it (not timed): bundle, node alias token, robot entry.
    const bundleFile = join(dir, "bundle.pem");
    await Deno.writeTextFile(bundleFile, await cli.bundlePem());
    const nodeId = nodeSpiffeId(TRUST_DOMAIN, "robot-001");
    const robotId = robotSpiffeId(TRUST_DOMAIN, "robot-001");
    const token = await cli.generateJoinToken(nodeId, 600);
    const tokenFile = join(dir, "token");
    await Deno.writeTextFile(tokenFile, token.value + "\n", { mode: 0o600 });
    await cli.createEntry({
      spiffeId: robotId,
      parentId: nodeId,
      selectors: [`unix:uid:${Deno.uid() ?? 0}`],
      dnsNames: ["robot-001"],
    });

    // The broker's certificate is minted directly (devenv gets it from broker-identity, whose
    // own agent path is the same as the robot's one measured below).
    const minted = await cli.mintX509({
      spiffeId: brokerSpiffeId(TRUST_DOMAIN),
      dnsNames: ["localhost"],
      ttlSeconds: 3600,
    });
    const mdir = join(dir, "mosq");
    await Deno.mkdir(mdir, { recursive: true, mode: 0o700 });
    await Deno.writeTextFile(join(mdir, "broker.crt"), minted.certPem, { mode: 0o600 });
    await Deno.writeTextFile(join(mdir, "broker.key"), minted.keyPem, { mode: 0o600 });
    const server = { username: "k8s4r-server", password: generatePassword() };
    const files = await writeBrokerFiles(mdir, {
      tlsPort,
      plainPort,
      cafile: bundleFile,
      certfile: join(mdir, "broker.crt"),
      keyfile: join(mdir, "broker.key"),
      server,
    });
    const ca = await Deno.readTextFile(bundleFile);
    t = performance.now();
    const mosq = await realRunner.spawn({
      name: "mosquitto",
      cmd: "mosquitto",
      args: ["-c", files.config],
      logFile: join(dir, "mosquitto.out"),
      ready: async () => {
        const [a, b] = await Promise.all([
          probeMqttPassword(plainPort, server.username, server.password),
          probeMqttTls({ port: tlsPort, ca, cert: minted.certPem, key: minted.keyPem }),
        ]);
        return a.ok && b.ok;
      },
      readyTimeoutMs: 20_000,
      readyIntervalMs: 20,
    });
    out.broker = performance.now() - t;
    cleanup.add("mosquitto", () => mosq.stop(5000));

    const socket = join(dir, "a", "agent.sock");
    await Deno.mkdir(join(dir, "a"), { mode: 0o755 });
    await Deno.mkdir(join(dir, "agent-data"), { mode: 0o700 });
    const agentConf = join(dir, "agent.conf");
    await Deno.writeTextFile(
      agentConf,
      renderAgentConfig({
        trustDomain: TRUST_DOMAIN,
        serverAddress: "127.0.0.1",
        serverPort: spirePort,
        socketPath: socket,
        dataDir: join(dir, "agent-data"),
        trustBundlePath: bundleFile,
        logLevel: "INFO",
        syncInterval: settings.agentSyncInterval,
      }),
    );
    t = performance.now();
    const agent = await realRunner.spawn({
      name: "spire-agent",
      cmd: bins.agent,
      args: ["run", "-config", agentConf, "-joinTokenFile", tokenFile],
      logFile: join(dir, "spire-agent.log"),
      ready: async () => (await grpcHealthCheck(socket, 1000)) === "SERVING",
      readyTimeoutMs: 60_000,
      readyIntervalMs: 20,
    });
    out.agent_attested = performance.now() - t;
    cleanup.add("spire-agent", () => agent.stop(5000));

    t = performance.now();
    const source = await X509Source.create({
      address: `unix://${socket}`,
      spiffeId: robotId,
      timeoutMs: 60_000,
    });
    out.first_svid = performance.now() - t;
    cleanup.add("X509Source", () => source.close());

    const tls = mtlsClientOptions(source, authorizeId(brokerSpiffeId(TRUST_DOMAIN)));
    t = performance.now();
    await new Promise<void>((resolve, reject) => {
      const c = mqtt.connect(`mqtts://localhost:${tlsPort}`, {
        clientId: "robot-001",
        protocolVersion: 5,
        reconnectPeriod: 0,
        connectTimeout: 10_000,
        key: tls.key,
        cert: tls.cert,
        ca: tls.ca,
        rejectUnauthorized: true,
        checkServerIdentity: tls.checkServerIdentity,
      } as mqtt.IClientOptions);
      c.once("connect", () => {
        out.mqtt_connect = performance.now() - t;
        c.end(true, {}, () => resolve());
      });
      c.once("error", (err) => {
        c.end(true);
        reject(err);
      });
    });
    return out;
  } finally {
    await cleanup.run();
  }
}

/** Wall time of a trivial CLI invocation: the fixed cost every k8s4r process pays. */
async function cliStartMs(): Promise<number> {
  const t = performance.now();
  await realRunner.output("deno", ["run", "-A", MAIN_TS, "--version"], { timeoutMs: 60_000 });
  return performance.now() - t;
}

interface Timings {
  totalMs: number;
  steps: { name: string; atMs: number; ms: number }[];
}

/** One `devenv start` of `stack`; its own timings and the wall time of the CLI. */
async function timedStart(stack: BenchStack, flags: readonly string[]) {
  const r = await stack.start(["--timeout", "120", ...flags]);
  if (r.code !== 0) {
    throw new Error(
      `devenv start ${flags.join(" ")} exited ${r.code}: ${
        r.stderr.trim().split("\n").slice(-2).join(" / ")
      }`,
    );
  }
  const timings = JSON.parse(await Deno.readTextFile(stack.files.timingsFile)) as Timings;
  return { wallMs: r.ms, timings };
}

/** Collects values per key, in insertion order. */
class Series {
  readonly values = new Map<string, number[]>();
  add(key: string, v: number): void {
    if (!this.values.has(key)) this.values.set(key, []);
    this.values.get(key)!.push(v);
  }
  get(key: string): number[] {
    return this.values.get(key) ?? [];
  }
}

export async function benchStartup(opts: BenchOptions, result: BenchResult): Promise<void> {
  const runs = opts.quick ? 1 : 3;
  const s = new Series();
  const perRun: unknown[] = [];
  for (let i = 0; i < runs; i++) {
    // Alternate which settings go first, so that a drift in machine load hits both alike.
    const order = i % 2 === 0 ? SETTINGS : [...SETTINGS].reverse();
    for (const set of order) {
      const stack = await BenchStack.create("k8s4r-bs-");
      try {
        opts.log(`startup run ${i + 1}/${runs} (${set.label}): devenv start in ${stack.dir}`);
        const cold = await timedStart(stack, set.flags);
        await stack.stop();
        const restart = await timedStart(stack, set.flags);
        s.add(`${set.id}.cold`, cold.timings.totalMs);
        s.add(`${set.id}.cold_wall`, cold.wallMs);
        s.add(`${set.id}.restart`, restart.timings.totalMs);
        s.add(`${set.id}.restart_wall`, restart.wallMs);
        if (set.id === "dev") {
          const own = (t: Timings) => t.steps.reduce((a, st) => a + st.ms, 0);
          s.add("dev.overlap.cold", cold.timings.totalMs / own(cold.timings));
          s.add("dev.overlap.restart", restart.timings.totalMs / own(restart.timings));
          for (const st of cold.timings.steps) s.add(`step.cold.${st.name}`, st.ms);
          for (const st of restart.timings.steps) s.add(`step.restart.${st.name}`, st.ms);
        }
        perRun.push({ run: i + 1, settings: set.id, cold, restart });
      } finally {
        await stack.destroy();
      }
      opts.log(`startup run ${i + 1}/${runs} (${set.label}): components alone`);
      const c = await componentTimes(set);
      let sum = 0;
      for (const [id] of COMPONENTS) {
        s.add(`${set.id}.component.${id}`, c[id]);
        sum += c[id];
      }
      s.add(`${set.id}.critical_path`, sum);
      const cold = s.get(`${set.id}.cold`).at(-1)!;
      s.add(`${set.id}.ratio`, cold / sum);
      opts.log(
        `startup run ${i + 1} (${set.label}): cold ${round(cold)} ms, restart ${
          round(s.get(`${set.id}.restart`).at(-1)!)
        } ms, components alone ${round(sum)} ms, ratio ${round(cold / sum)}`,
      );
    }
    s.add("cli", await cliStartMs());
  }

  const sec = (v: number[]) => v.map((x) => x / 1000);
  for (const set of SETTINGS) {
    const tag = `(${set.label})`;
    result.figures.push(
      figure(
        `startup.${set.id}.cold`,
        `devenv start, cold → robot online ${tag}`,
        "s",
        sec(s.get(`${set.id}.cold`)),
        set.id === "dev" ? { target: { op: "<=", value: 2.5, on: "median" } } : {},
      ),
      figure(
        `startup.${set.id}.restart`,
        `devenv start after stop → robot online ${tag}`,
        "s",
        sec(s.get(`${set.id}.restart`)),
        set.id === "dev" ? { target: { op: "<=", value: 1.0, on: "median" } } : {},
      ),
      figure(
        `startup.${set.id}.critical_path`,
        `sum of the components alone ${tag}`,
        "s",
        sec(s.get(`${set.id}.critical_path`)),
      ),
      figure(
        `startup.${set.id}.ratio`,
        `cold total / sum of the components alone, same run ${tag}`,
        "×",
        s.get(`${set.id}.ratio`),
      ),
    );
  }
  for (const set of SETTINGS) {
    const tag = `(${set.label})`;
    result.figures.push(
      figure(
        `startup.${set.id}.cold_wall`,
        `cold, wall time incl. the CLI's own start ${tag}`,
        "s",
        sec(s.get(`${set.id}.cold_wall`)),
      ),
      figure(
        `startup.${set.id}.restart_wall`,
        `after stop, wall time incl. the CLI's own start ${tag}`,
        "s",
        sec(s.get(`${set.id}.restart_wall`)),
      ),
    );
  }
  for (const phase of ["cold", "restart"]) {
    result.figures.push(
      figure(
        `startup.dev.overlap.${phase}`,
        `${phase}: total / sum of its steps' own times (< 1: steps overlap)`,
        "×",
        s.get(`dev.overlap.${phase}`),
      ),
    );
  }
  for (const phase of ["cold", "restart"]) {
    for (const [key, v] of s.values) {
      const prefix = `step.${phase}.`;
      if (!key.startsWith(prefix)) continue;
      const name = key.slice(prefix.length);
      result.figures.push(
        figure(`startup.step.${phase}.${name}`, `${phase} step: ${name} (own time)`, "ms", v),
      );
    }
  }
  for (const set of SETTINGS) {
    for (const [id, label] of COMPONENTS) {
      result.figures.push(
        figure(
          `startup.${set.id}.component.${id}`,
          `alone: ${label} (${set.label})`,
          "ms",
          s.get(`${set.id}.component.${id}`),
        ),
      );
    }
  }
  result.figures.push(
    figure(
      "startup.cli",
      "`deno run main.ts --version` (fixed cost of each k8s4r process)",
      "ms",
      s.get("cli"),
    ),
  );
  const med = (k: string) => round(median(s.get(k)) / 1000);
  result.notes.push(
    `Side by side (medians of ${runs}): cold ${med("dev.cold")} s with devenv's SPIRE settings ` +
      `vs ${med("spire_defaults.cold")} s with SPIRE's defaults; after stop ${
        med("dev.restart")
      } s vs ${med("spire_defaults.restart")} s.`,
    `devenv's SPIRE settings: server cache_reload_interval ${DEV_SPIRE_TIMING.serverCacheReloadInterval} ` +
      `with events_based_cache ${DEV_SPIRE_TIMING.serverEventsBasedCache}, ratelimit.attestation ` +
      `${DEV_SPIRE_TIMING.serverAttestationRateLimit}, agent sync_interval ` +
      `${DEV_SPIRE_TIMING.agentSyncInterval}; SPIRE's defaults: 5s with full reloads, true, 5s.`,
  );
  result.details = { perRun, series: Object.fromEntries(s.values) };
}
