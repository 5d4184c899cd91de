/** Fakes for doctor tests: an in-memory file system, scripted network and SPIRE, fixed clock. */
import { bufferIo } from "../cli/io.ts";
import { type ProcessRunner, RecordingRunner } from "../process/mod.ts";
import type {
  CheckContext,
  ControlHostPaths,
  DoctorNet,
  DoctorOptions,
  DoctorProc,
  DoctorSpire,
  FileInfo,
  RobotHostContext,
} from "./check.ts";
import { makeMemo } from "./check.ts";

export const ROOT = "/proj";

/** The dev stack's default layout for a project in ROOT (what src/cli/doctor_paths.ts gives). */
export const LAYOUT: ControlHostPaths = {
  root: ROOT,
  trustDomain: "k8s4r.example.org",
  ports: {
    spireServer: 8081,
    mqttPlain: 1883,
    mqttTls: 8883,
    http: 8090,
    telemetry: 9800,
    prometheus: 9090,
  },
  spireServerSocket: `${ROOT}/.spire-data/server/api.sock`,
  spireServerConfig: `${ROOT}/config/spire/server.conf`,
  agentPluginsYaml: `${ROOT}/config/agent/plugins.yaml`,
  caBundleFile: `${ROOT}/config/mosquitto/certs/spire-ca.crt`,
  mosquittoDir: `${ROOT}/.dev-env/mosquitto`,
  serverCredentialsFile: `${ROOT}/.dev-env/server-mqtt.json`,
  files: {
    spireServerLog: `${ROOT}/.dev-env/spire-server.log`,
    serverLog: `${ROOT}/.dev-env/server.log`,
    mosquittoLog: `${ROOT}/.dev-env/mosquitto.log`,
    brokerIdentityLog: `${ROOT}/.dev-env/broker-identity.log`,
    brokerStateFile: `${ROOT}/.dev-env/broker.json`,
  },
  brokerContainer: "k8s4r-mosquitto-test",
};
export const NOW = Date.parse("2030-01-01T00:00:00Z");

export interface FakeOptions {
  files?: Record<string, string>;
  /** Extra entries (sockets, dirs, modes); files in `files` are regular 0644 files. */
  stats?: Record<string, Partial<FileInfo>>;
  which?: Record<string, string>;
  /** Symbolic links: path -> what realPath gives. */
  links?: Record<string, string>;
  net?: Partial<DoctorNet>;
  /** Default: no process is visible. */
  proc?: Partial<DoctorProc>;
  spire?: Partial<DoctorSpire>;
  runner?: ProcessRunner;
  options?: Partial<DoctorOptions>;
  env?: Record<string, string | undefined>;
  now?: number;
  /** Run as a robot host with these paths. */
  robotHost?: RobotHostContext;
}

const fileInfo = (p: Partial<FileInfo>): FileInfo => ({
  isFile: false,
  isDirectory: false,
  isSocket: false,
  isSymlink: false,
  mode: 0o644,
  size: 0,
  ...p,
});

/**
 * lstat entries for `dir` and every directory above it: root-owned 0755 (`/tmp` 1777), the last
 * one as `last` says. What a socket-directory check needs to see.
 */
export function dirChain(
  dir: string,
  last: Partial<FileInfo> = {},
): Record<string, Partial<FileInfo>> {
  const out: Record<string, Partial<FileInfo>> = {
    "/": { isDirectory: true, mode: 0o755, uid: 0 },
  };
  let cur = "";
  for (const part of dir.split("/").filter((p) => p)) {
    cur = `${cur}/${part}`;
    out[cur] = { isDirectory: true, mode: cur === "/tmp" ? 0o1777 : 0o755, uid: 0 };
  }
  out[cur || "/"] = { ...out[cur || "/"], ...last };
  return out;
}

export function fakeContext(
  o: FakeOptions = {},
): CheckContext & { written: Map<string, { data: string; mode: number }>; removed: string[] } {
  const env = o.env ?? {};
  const layout = LAYOUT;
  const options: DoctorOptions = {
    robotId: "robot-001",
    broker: "native",
    production: false,
    timeoutMs: 2000,
    container: "k8s4r-mosquitto-test",
    ...o.options,
  };
  const files = new Map(Object.entries(o.files ?? {}));
  const written = new Map<string, { data: string; mode: number }>();
  const removed: string[] = [];
  const unreachable = (what: string) => () => Promise.reject(new Error(`${what}: not faked`));
  return {
    io: bufferIo({ cwd: ROOT, env }),
    env,
    layout,
    robot: {
      robotId: "robot-001",
      spiffeId: "spiffe://k8s4r.example.org/robot/robot-001",
      nodeSpiffeId: "spiffe://k8s4r.example.org/k8s4r/node/robot-001",
      agentSocket: "/tmp/spire-agent/agent.sock",
      agentDataDir: `${ROOT}/.spire-data/agent`,
      joinTokenFile: `${ROOT}/.dev-env/tokens/robot-001.token`,
      logFile: `${ROOT}/.dev-env/agent.log`,
    },
    options,
    ...(o.robotHost ? { robotHost: o.robotHost } : {}),
    fs: {
      readTextFile(p) {
        const f = files.get(p) ?? written.get(p)?.data;
        return f !== undefined
          ? Promise.resolve(f)
          : Promise.reject(new Error(`No such file or directory: ${p}`));
      },
      stat(p) {
        if (o.stats?.[p]) return Promise.resolve(fileInfo(o.stats[p]));
        const f = files.get(p);
        return Promise.resolve(
          f !== undefined ? fileInfo({ isFile: true, size: f.length }) : undefined,
        );
      },
      makeTempDir: () => Promise.resolve("/tmp/fake-doctor"),
      writeFile(p, data, mode) {
        written.set(p, { data, mode });
        return Promise.resolve();
      },
      removeAll(p) {
        removed.push(p);
        return Promise.resolve();
      },
      which: (n) => Promise.resolve(o.which?.[n]),
      realPath: (p) => Promise.resolve(o.links?.[p] ?? p),
    },
    net: {
      listeningOwner: () => Promise.resolve(undefined),
      httpGet: unreachable("httpGet"),
      mqttProbe: unreachable("mqttProbe"),
      tcpConnect: unreachable("tcpConnect"),
      tlsHandshake: unreachable("tlsHandshake"),
      ...o.net,
    },
    proc: {
      unixSocketOwner: () => Promise.resolve(undefined),
      stat: () => Promise.resolve(undefined),
      ...o.proc,
    },
    spire: {
      findBinaries: () => Promise.resolve(undefined),
      health: unreachable("health"),
      isAttested: () => Promise.resolve(false),
      fetchX509Svids: unreachable("fetchX509Svids"),
      verifyChain: () => ({ ok: true }),
      agentData: () => Promise.resolve(undefined),
      ...o.spire,
    },
    runner: o.runner ?? new RecordingRunner(),
    clock: { now: () => o.now ?? NOW },
    uid: 0,
    memo: makeMemo(),
    signal: new AbortController().signal,
    timeoutMs: options.timeoutMs,
    written,
    removed,
  };
}
