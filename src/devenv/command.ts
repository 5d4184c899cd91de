import type { Args, CommandSpec, FlagSpec } from "../cli/mod.ts";
import { UsageError } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { GO_DURATION } from "../spire/agent.ts";
import { installCommand } from "../spire/install.ts";
import { DEV_SPIRE_TIMING } from "./components.ts";
import { runBrokerIdentity } from "./broker_identity_run.ts";
import { runSpireServer } from "./spire_server_run.ts";
import {
  type BrokerModeFlag,
  checkAdvertise,
  type DevenvContext,
  LAYOUT_FLAGS,
  readState,
  resolveContext,
  robotIds,
  withAdvertise,
} from "./context.ts";
import { devenvLogs } from "./logs.ts";
import { devenvStart } from "./start.ts";
import { runPrometheus } from "./monitoring.ts";
import { TELEMETRY_PORT_SPAN } from "../fleet/ports.ts";
import { devenvStatus } from "./status.ts";
import { devenvClean, devenvStop } from "./stop.ts";

function positiveSeconds(args: Args, flag: string): number | undefined {
  if (!args.has(flag)) return undefined;
  const n = args.number(flag)!;
  if (!Number.isInteger(n) || n < 1) {
    throw new UsageError(`devenv start: --${flag} expects whole seconds >= 1, got ${n}`);
  }
  return n;
}

/** SPIRE checks its CA for rotation every 10 s; below this the CA could expire unrotated. */
export const MIN_CA_TTL_SECONDS = 60;

/** `--ca-ttl` over env `K8S4R_SPIRE_CA_TTL`; undefined = the config file's `ca_ttl`. */
export function caTtlSeconds(
  args: Args,
  env: Record<string, string | undefined>,
): number | undefined {
  let n: number | undefined;
  let from = "--ca-ttl";
  if (args.has("ca-ttl")) n = args.number("ca-ttl")!;
  else if (env["K8S4R_SPIRE_CA_TTL"]) {
    from = "environment variable K8S4R_SPIRE_CA_TTL";
    n = /^\d+$/.test(env["K8S4R_SPIRE_CA_TTL"]) ? Number(env["K8S4R_SPIRE_CA_TTL"]) : NaN;
  }
  if (n === undefined) return undefined;
  if (!Number.isInteger(n) || n < MIN_CA_TTL_SECONDS) {
    throw new UsageError(
      `${from}: expected whole seconds >= ${MIN_CA_TTL_SECONDS}, got ${
        from === "--ca-ttl" ? n : `'${env["K8S4R_SPIRE_CA_TTL"]}'`
      }`,
    );
  }
  return n;
}

/** What `start` hands to its hidden `spire-server` and `broker-identity` children. */
const HIDDEN_SPIRE_FLAGS: FlagSpec[] = [
  {
    name: "spire-server-bin",
    type: "string",
    valueName: "PATH",
    description: "spire-server, already checked by start",
  },
  {
    name: "spire-agent-bin",
    type: "string",
    valueName: "PATH",
    description: "spire-agent, already checked by start",
  },
  {
    name: "cache-reload-interval",
    type: "string",
    valueName: "DURATION",
    description: "server experimental.cache_reload_interval",
  },
  {
    name: "spire-sync-interval",
    type: "string",
    valueName: "DURATION",
    description: "agent experimental.sync_interval",
  },
  {
    name: "no-attestation-rate-limit",
    type: "boolean",
    description: "server ratelimit.attestation = false",
  },
  {
    name: "events-based-cache",
    type: "boolean",
    description: "server experimental.events_based_cache = true",
  },
  {
    name: "x509pop-ca",
    type: "string",
    valueName: "FILE",
    description: "server NodeAttestor x509pop with this factory CA bundle",
  },
];

function goDuration(args: Args, flag: string): string | undefined {
  const v = args.string(flag);
  if (v !== undefined && !GO_DURATION.test(v)) {
    throw new UsageError(`--${flag}: expected a Go duration like 500ms or 5s, got '${v}'`);
  }
  return v;
}

/** The telemetry ports (SPIRE exporters, agents' /metrics) must fit below 65536. */
function checkTelemetryPorts(ctx: DevenvContext): void {
  const base = ctx.layout.ports.telemetry;
  if (base < 1 || base + TELEMETRY_PORT_SPAN > 65535) {
    throw new UsageError(
      `telemetry port ${base}: expected a port in [1, ${
        65535 - TELEMETRY_PORT_SPAN
      }] (it and the ${TELEMETRY_PORT_SPAN} above it are the stack's telemetry ports)`,
    );
  }
}

function serverIndex(args: Args): 1 | 2 {
  const n = args.number("server") ?? 1;
  if (n !== 1 && n !== 2) throw new UsageError(`--server: expected 1 or 2, got ${n}`);
  return n;
}

function withContext(
  fn: (ctx: DevenvContext, args: Args) => Promise<number>,
): (args: Args, io: Io) => Promise<number> {
  return (args, io) => fn(resolveContext(args, io), args);
}

export const devenvCommand: CommandSpec = {
  name: "devenv",
  summary: "Start, inspect and stop the local SPIRE + Mosquitto + server + agent stack",
  subcommands: [
    {
      name: "install",
      summary: "Provision spire-server, spire-agent and mosquitto",
      run: (args, io) => installCommand(args, io),
    },
    {
      name: "start",
      summary: "Start the whole stack (idempotent: restarts only what is down)",
      description:
        "Starts the SPIRE server, creates join tokens and registration entries, exports the\n" +
        "trust bundle, gives Mosquitto an X.509 SVID (broker-identity), starts Mosquitto, the\n" +
        "k8s4r server and one k8s4r agent per robot, and returns once every robot is online.\n" +
        "Env: ROBOT_ID (single robot id), MQTT_BROKER_URL (what agents connect to), and the\n" +
        "K8S4R_* port variables below.",
      flags: [
        {
          name: "robots",
          type: "number",
          valueName: "N",
          description:
            "Run robot-001..robot-N on this host (default: ROBOT_ID or robot-001; 0: none, a control host only)",
        },
        {
          name: "broker",
          type: "string",
          valueName: "MODE",
          description: "native, docker or auto (default auto: native mosquitto, then docker)",
        },
        {
          name: "advertise",
          type: "string",
          valueName: "ADDR",
          description: "Serve robots on other hosts at ADDR (env K8S4R_ADVERTISE): the SPIRE " +
            "server's agent port binds ADDR and the broker gets an mTLS listener on it; 1883, " +
            "the HTTP API and admin sockets stay on loopback. Kept by later starts " +
            "(--advertise 127.0.0.1: loopback only again)",
        },
        {
          name: "attestation",
          type: "string",
          valueName: "TYPE",
          description: "x509pop: also run SPIRE's x509pop NodeAttestor, with a factory CA " +
            "(.dev-env/factory-ca/, key 0600) that robot add --attestation x509pop signs " +
            "with; local robots keep join tokens. Kept by later starts",
        },
        ...LAYOUT_FLAGS,
        {
          name: "svid-ttl",
          type: "number",
          valueName: "SECONDS",
          description: "X.509 SVID TTL of the robots' entries (default: server default)",
        },
        {
          name: "broker-svid-ttl",
          type: "number",
          valueName: "SECONDS",
          description: "X.509 SVID TTL of the broker's entry (default: server default)",
        },
        {
          name: "server-svid-ttl",
          type: "number",
          valueName: "SECONDS",
          description: "X.509 SVID TTL of the fleet server's entry (default: server default)",
        },
        {
          name: "ca-ttl",
          type: "number",
          valueName: "SECONDS",
          description: "SPIRE server ca_ttl (env K8S4R_SPIRE_CA_TTL; default: config/spire/" +
            "server.conf). The next CA enters the bundle at 1/2 of it and signs from 5/6 on; " +
            "applies when the server (re)starts",
        },
        {
          name: "timeout",
          type: "number",
          valueName: "SECONDS",
          description: "How long to wait for the robots to come online (default 120)",
        },
        {
          name: "monitoring",
          type: "boolean",
          description: "Also run Prometheus (Debian's) on 127.0.0.1:9090 (--prometheus-port), " +
            "scraping the fleet servers, SPIRE and every agent with config/prometheus/alerts.yaml",
        },
        {
          name: "ha",
          type: "boolean",
          description: "Scale-out stack: PostgreSQL (under .dev-env), two SPIRE servers sharing " +
            "it behind haproxy on the SPIRE port, under the root CA (implies --root-ca). Kept " +
            "by later starts",
        },
        {
          name: "root-ca",
          type: "boolean",
          description: "SPIRE's CA signed by the root CA in .spire-data/ca (`k8s4r ca init`, " +
            "made if missing): SPIRE's CA rotations keep the trust bundle. Kept by later starts",
        },
        {
          name: "agent-ttl",
          type: "number",
          valueName: "SECONDS",
          description: "SPIRE agents' SVID lifetime (server agent_ttl; default SPIRE's); " +
            "applies when the servers (re)start",
        },
        {
          name: "spire-defaults",
          type: "boolean",
          description: `Run SPIRE with its own sync and cache-reload intervals (5s) and ` +
            `attestation rate limit instead of devenv's (agent sync ` +
            `${DEV_SPIRE_TIMING.agentSyncInterval}, server cache reload ` +
            `${DEV_SPIRE_TIMING.serverCacheReloadInterval}, no attestation limit); applies to ` +
            "what this start launches",
        },
      ],
      run: withContext((ctx0, args) => {
        const prev = readState(ctx0);
        const flag = args.string("advertise") ?? (ctx0.env["K8S4R_ADVERTISE"] || undefined);
        // --advertise 127.0.0.1 (or localhost): back to loopback only.
        const advertise = flag === undefined
          ? prev?.advertise
          : ["127.0.0.1", "localhost", "::1"].includes(flag)
          ? undefined
          : checkAdvertise(flag);
        const att = args.string("attestation");
        if (att !== undefined && att !== "x509pop" && att !== "join-token") {
          throw new UsageError(
            `devenv start: --attestation expects x509pop or join-token, got '${att}'`,
          );
        }
        const x509pop = att === "x509pop" || (att === undefined && prev?.attestation === "x509pop");
        const ctx = withAdvertise(ctx0, advertise);
        const mode = args.string("broker") ?? "auto";
        checkTelemetryPorts(ctx);
        if (!["native", "docker", "auto"].includes(mode)) {
          throw new UsageError(
            `devenv start: --broker expects native, docker or auto, got '${mode}'`,
          );
        }
        const timeout = positiveSeconds(args, "timeout");
        return devenvStart(ctx, {
          robots: robotIds(args.number("robots"), ctx.env),
          broker: mode as BrokerModeFlag,
          svidTtl: positiveSeconds(args, "svid-ttl"),
          brokerSvidTtl: positiveSeconds(args, "broker-svid-ttl"),
          serverSvidTtl: positiveSeconds(args, "server-svid-ttl"),
          caTtl: caTtlSeconds(args, ctx.env),
          brokerUrl: ctx.env["MQTT_BROKER_URL"] || undefined,
          onlineTimeoutMs: timeout !== undefined ? timeout * 1000 : undefined,
          spireDefaults: args.bool("spire-defaults"),
          monitoring: args.bool("monitoring"),
          ha: args.bool("ha"),
          rootCa: args.bool("root-ca"),
          agentTtl: positiveSeconds(args, "agent-ttl"),
          advertise,
          x509pop,
        });
      }),
    },
    {
      name: "status",
      summary: "Show each component's state (exit 1 when something is down)",
      flags: [
        { name: "json", type: "boolean", description: 'Print JSON: {"components":[...]}' },
        ...LAYOUT_FLAGS,
      ],
      run: withContext((ctx, args) => devenvStatus(ctx, args.bool("json"))),
    },
    {
      name: "logs",
      summary: "Show component logs, prefixed like docker compose",
      positionals: [{ name: "component", description: "Components to show", variadic: true }],
      flags: [
        { name: "follow", short: "f", type: "boolean", description: "Keep following" },
        {
          name: "lines",
          short: "n",
          type: "number",
          valueName: "N",
          description: "Lines per component from the end (default 100)",
        },
        ...LAYOUT_FLAGS,
      ],
      run: withContext((ctx, args) =>
        devenvLogs(ctx, args.positionals, args.bool("follow"), args.number("lines") ?? 100)
      ),
    },
    {
      name: "stop",
      summary: "Stop everything devenv started (SIGTERM, then SIGKILL)",
      flags: [...LAYOUT_FLAGS],
      run: withContext((ctx) => devenvStop(ctx)),
    },
    {
      name: "clean",
      summary: "Stop, then delete all devenv state (.dev-env, .spire-data, sockets, exported CA)",
      flags: [...LAYOUT_FLAGS],
      run: withContext((ctx) => devenvClean(ctx)),
    },
    {
      name: "spire-server",
      summary: "Run spire-server with join tokens redacted from its log (run by start)",
      hidden: true,
      flags: [
        ...LAYOUT_FLAGS,
        { name: "ca-ttl", type: "number", valueName: "SECONDS", description: "ca_ttl" },
        ...HIDDEN_SPIRE_FLAGS,
        { name: "server", type: "number", valueName: "N", description: "1 or 2 (--ha)" },
        { name: "ha", type: "boolean", description: "PostgreSQL datastore, own port" },
        { name: "root-ca", type: "boolean", description: "UpstreamAuthority disk" },
        { name: "agent-ttl", type: "string", valueName: "DURATION", description: "agent_ttl" },
      ],
      run: withContext((ctx, args) =>
        runSpireServer(ctx, {
          server: serverIndex(args),
          ha: args.bool("ha"),
          rootCa: args.bool("root-ca"),
          agentTtl: goDuration(args, "agent-ttl"),
          caTtl: caTtlSeconds(args, {}),
          bin: args.string("spire-server-bin"),
          cacheReloadInterval: goDuration(args, "cache-reload-interval"),
          attestationRateLimit: args.bool("no-attestation-rate-limit") ? false : undefined,
          eventsBasedCache: args.bool("events-based-cache") ? true : undefined,
          x509popCaBundle: args.string("x509pop-ca"),
        })
      ),
    },
    {
      name: "prometheus",
      summary: "Run Prometheus and keep its scrape credential fresh (run by start --monitoring)",
      hidden: true,
      flags: [...LAYOUT_FLAGS, ...HIDDEN_SPIRE_FLAGS],
      run: withContext((ctx, args) =>
        runPrometheus(ctx, { spireServerBin: args.string("spire-server-bin") })
      ),
    },
    {
      name: "broker-identity",
      summary: "Keep Mosquitto's certificate a current SPIRE X.509 SVID (run by start)",
      hidden: true,
      flags: [...LAYOUT_FLAGS, ...HIDDEN_SPIRE_FLAGS],
      run: withContext((ctx, args) =>
        runBrokerIdentity(ctx, {
          bin: args.string("spire-agent-bin"),
          syncInterval: goDuration(args, "spire-sync-interval"),
        })
      ),
    },
  ],
};
