/**
 * Startup: `devenv start` from cold (binaries cached, fresh project dir, fresh SPIRE data) until
 * the robot is online, step by step (`.dev-env/start-timings.json`), and, in the same run, each
 * component's own readiness when started alone and back to back:
 *
 *   SPIRE server healthy -> agent attested (Workload API serving) -> first SVID ->
 *   broker accepting (mTLS + password listeners) -> MQTT mTLS connection (CONNACK)
 *
 * The ratio devenv total / sum of that critical path shows what devenv adds. Repeated `runs`
 * times, cleaning between runs.
 */
import { join } from "node:path";
import mqtt from "mqtt";
import { bufferIo } from "../src/cli/io.ts";
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
import { round } from "./stats.ts";

const COMPONENTS = [
  ["spire_server", "SPIRE server healthy"],
  ["agent_attested", "SPIRE agent attested, Workload API serving"],
  ["first_svid", "first X.509 SVID at the workload"],
  ["broker", "mosquitto accepting (mTLS + password)"],
  ["mqtt_connect", "MQTT mTLS connection (CONNACK)"],
] as const;
type ComponentId = typeof COMPONENTS[number][0];

/** Starts each component alone, back to back, in a temp dir; returns each one's readiness ms. */
export async function componentTimes(): Promise<Record<ComponentId, number>> {
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

    // The broker's certificate is minted directly (devenv gets it from broker-identity, whose
    // own agent path is the same as the robot's one measured above).
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

export async function benchStartup(opts: BenchOptions, result: BenchResult): Promise<void> {
  const runs = opts.quick ? 1 : 3;
  const totals: number[] = [];
  const walls: number[] = [];
  const steps = new Map<string, number[]>();
  const comps = new Map<ComponentId, number[]>();
  const sums: number[] = [];
  const ratios: number[] = [];
  const cliMs: number[] = [];
  const perRun: unknown[] = [];
  for (let i = 0; i < runs; i++) {
    const stack = await BenchStack.create("k8s4r-bs-");
    try {
      opts.log(`startup run ${i + 1}/${runs}: devenv start in ${stack.dir}`);
      const r = await stack.start(["--timeout", "120"]);
      if (r.code !== 0) {
        throw new Error(
          `devenv start exited ${r.code}: ${r.stderr.trim().split("\n").slice(-2).join(" / ")}`,
        );
      }
      const timings = JSON.parse(await Deno.readTextFile(stack.files.timingsFile)) as {
        totalMs: number;
        steps: { name: string; ms: number }[];
      };
      totals.push(timings.totalMs);
      walls.push(r.ms);
      for (const s of timings.steps) {
        if (!steps.has(s.name)) steps.set(s.name, []);
        steps.get(s.name)!.push(s.ms);
      }
      perRun.push({ wallMs: r.ms, timings });
    } finally {
      await stack.destroy();
    }
    opts.log(`startup run ${i + 1}/${runs}: components alone`);
    const c = await componentTimes();
    let sum = 0;
    for (const [id] of COMPONENTS) {
      if (!comps.has(id)) comps.set(id, []);
      comps.get(id)!.push(c[id]);
      sum += c[id];
    }
    sums.push(sum);
    ratios.push(totals[totals.length - 1] / sum);
    cliMs.push(await cliStartMs());
    opts.log(
      `startup run ${i + 1}: devenv ${round(totals[i])} ms, critical path ${round(sum)} ms, ratio ${
        round(ratios[i])
      }`,
    );
  }
  result.figures.push(
    figure(
      "startup.total",
      "devenv start, cold → robot online (start-timings total)",
      "s",
      totals.map((v) => v / 1000),
    ),
    figure(
      "startup.wall",
      "devenv start wall time incl. the CLI's own start",
      "s",
      walls.map((v) => v / 1000),
    ),
  );
  for (const [name, v] of steps) {
    result.figures.push(figure(`startup.step.${name}`, `step: ${name}`, "ms", v));
  }
  for (const [id, label] of COMPONENTS) {
    result.figures.push(figure(`startup.component.${id}`, `alone: ${label}`, "ms", comps.get(id)!));
  }
  result.figures.push(
    figure("startup.critical_path", "sum of the components alone", "s", sums.map((v) => v / 1000)),
    figure("startup.ratio", "devenv total / critical-path sum (same run)", "×", ratios, {
      target: { op: "<=", value: 1.3, on: "median" },
    }),
    figure(
      "startup.cli",
      "`deno run main.ts --version` (fixed cost of each k8s4r process)",
      "ms",
      cliMs,
    ),
  );
  result.details = { perRun, components: Object.fromEntries(comps) };
}
