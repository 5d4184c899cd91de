/**
 * A REAL mosquitto for integration tests, with the configuration k8s4r generates
 * (src/mqtt/broker_config.ts): an mTLS listener and a loopback password listener on free ports,
 * in a temp dir, with certificates from a throwaway CA.
 *
 * Certificates come from the shared TestCa (src/spiffe/testing/test_ca.ts) and look like
 * SPIRE's: CN = DNS name, a `spiffe://` URI SAN, EC P-256.
 *
 * Ready = a real MQTT CONNECT with the server's password succeeds on the plain port (a probe,
 * never a sleep).
 */
import { join } from "node:path";
import { freePorts } from "./ports.ts";
import { type Daemon, type ProcessRunner, realRunner } from "../../src/process/mod.ts";
import { type IssuedCert, type IssueOptions, TestCa } from "../../src/spiffe/testing/test_ca.ts";
import {
  type BrokerFiles,
  generatePassword,
  writeBrokerFiles,
} from "../../src/mqtt/broker_config.ts";
import { probeMqtt } from "../../src/mqtt/probe.ts";
import { BROKER_ADMIN_USERNAME, findDynsecPlugin } from "../../src/mqtt/dynsec.ts";

export const TEST_TRUST_DOMAIN = "k8s4r.test";

export interface PemCert {
  cert: string;
  key: string;
  /** The CA bundle to trust (PEM). */
  ca: string;
  certFile: string;
  keyFile: string;
}

export interface TestBroker {
  dir: string;
  tlsPort: number;
  plainPort: number;
  server: { username: string; password: string };
  /** The dynamic-security admin login (`k8s4r robot remove` uses it). */
  admin: { username: string; password: string };
  files: BrokerFiles;
  caFile: string;
  brokerSpiffeId: string;
  plainUrl: string;
  tlsUrl: string;
  ca: FileCa;
  /** Issues a client certificate with CN = `cn` and URI SAN `spiffe://k8s4r.test/robot/<cn>`. */
  issueCert(cn: string, opts?: { spiffeId?: string }): Promise<PemCert & { issued: IssuedCert }>;
  /** Stops (SIGTERM, so mosquitto saves its persistence) and starts again on the same ports. */
  restart(): Promise<void>;
  /** SIGKILL: nothing is saved beyond the last autosave. Start again with `start()`. */
  kill9(): Promise<void>;
  start(): Promise<void>;
  stop(): Promise<void>;
  running(): boolean;
  /** The running mosquitto's pid (benchmarks sample its CPU), undefined while stopped. */
  pid(): number | undefined;
  logTail(): Promise<string>;
}

/**
 * Writes certificates issued by the shared TestCa (src/spiffe/testing/test_ca.ts) to files, in
 * the shapes SPIRE produces: CN = first DNS name, a `spiffe://` URI SAN, EC P-256.
 */
export class FileCa {
  readonly ca: TestCa;
  readonly caFile: string;
  private constructor(readonly dir: string) {
    this.ca = TestCa.create({ trustDomain: TEST_TRUST_DOMAIN });
    this.caFile = join(dir, "bundle.crt");
  }

  static async create(dir: string): Promise<FileCa> {
    await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
    const ca = new FileCa(dir);
    await Deno.writeTextFile(ca.caFile, ca.ca.rootPem);
    return ca;
  }

  async issue(name: string, opts: IssueOptions): Promise<PemCert & { issued: IssuedCert }> {
    const issued = this.ca.issue(opts);
    const certFile = join(this.dir, `${name}.crt`);
    const keyFile = join(this.dir, `${name}.key`);
    await Deno.writeTextFile(certFile, issued.chainPem);
    await Deno.writeTextFile(keyFile, issued.keyPem, { mode: 0o600 });
    return {
      cert: issued.chainPem,
      key: issued.keyPem,
      ca: issued.bundlePem,
      certFile,
      keyFile,
      issued,
    };
  }
}

/** A broker certificate from elsewhere (a real SPIRE server's `x509 mint`) and the CA to trust. */
export interface BrokerPki {
  /** The bundle clients are checked against (mosquitto's cafile). */
  caFile: string;
  certFile: string;
  keyFile: string;
  brokerSpiffeId: string;
}

export async function startTestBroker(
  opts: {
    runner?: ProcessRunner;
    tlsAdminUsers?: string[];
    /** Use this PKI instead of the throwaway TestCa (the client helpers then do not apply). */
    pki?: BrokerPki;
    /** Bind the mTLS listener here (default 127.0.0.1), e.g. a test network's address. */
    tlsBind?: string | string[];
    maxQueuedBytes?: number;
    maxQueuedMessages?: number;
    /** Lines appended to the generated mosquitto.conf (to test options k8s4r does not write). */
    extraConfig?: string[];
  } = {},
): Promise<TestBroker> {
  const runner = opts.runner ?? realRunner;
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-broker-" });
  const ca = await FileCa.create(join(dir, "ca"));
  const brokerSpiffeId = opts.pki?.brokerSpiffeId ?? `spiffe://${TEST_TRUST_DOMAIN}/mqtt-broker`;
  // Clients connect to 127.0.0.1 with servername "localhost" (the SAN SPIRE would give it).
  const brokerCert = opts.pki
    ? { certFile: opts.pki.certFile, keyFile: opts.pki.keyFile }
    : await ca.issue("broker", { spiffeId: brokerSpiffeId, dnsNames: ["localhost"] });
  const caFile = opts.pki?.caFile ?? ca.caFile;
  const [tlsPort, plainPort] = freePorts(2);
  const server = { username: "k8s4r-server", password: generatePassword() };
  const admin = { username: BROKER_ADMIN_USERNAME, password: generatePassword() };
  const dynsecPlugin = await findDynsecPlugin(Deno.env.toObject());
  if (!dynsecPlugin) {
    throw new Error(
      "mosquitto_dynamic_security.so not found (Debian's mosquitto package ships it): install mosquitto, or set K8S4R_MOSQUITTO_DYNSEC",
    );
  }
  const files = await writeBrokerFiles(join(dir, "mosquitto"), {
    tlsPort,
    plainPort,
    cafile: caFile,
    certfile: brokerCert.certFile,
    keyfile: brokerCert.keyFile,
    server,
    admin,
    dynsecPlugin,
    tlsAdminUsers: opts.tlsAdminUsers,
    tlsBind: opts.tlsBind,
    maxQueuedBytes: opts.maxQueuedBytes,
    maxQueuedMessages: opts.maxQueuedMessages,
  });
  if (opts.extraConfig?.length) {
    await Deno.writeTextFile(files.config, opts.extraConfig.join("\n") + "\n", { append: true });
  }
  const stdoutLog = join(dir, "mosquitto.stdout.log");
  let daemon: Daemon | undefined;
  let exited = true;

  const start = async () => {
    if (daemon && !exited) throw new Error("test broker already running");
    daemon = await runner.spawn({
      name: "mosquitto",
      cmd: "mosquitto",
      args: ["-c", files.config],
      logFile: stdoutLog,
      pidFile: join(dir, "mosquitto.pid"),
      ready: async () => (await probeMqtt({ port: plainPort, ...server, timeoutMs: 1000 })).ok,
      readyTimeoutMs: 15_000,
    });
    exited = false;
    daemon.exited.then(() => (exited = true));
  };

  const stop = async () => {
    if (daemon && !exited) await daemon.stop(5000);
    if (daemon) await daemon.exited;
    exited = true;
  };

  const logTail = async () => {
    try {
      const t = await Deno.readTextFile(files.logFile);
      return t.split("\n").slice(-30).join("\n");
    } catch {
      return "";
    }
  };

  await start();

  return {
    dir,
    tlsPort,
    plainPort,
    server,
    admin,
    files,
    caFile,
    brokerSpiffeId,
    plainUrl: `mqtt://127.0.0.1:${plainPort}`,
    tlsUrl: `mqtts://${[opts.tlsBind ?? "127.0.0.1"].flat()[0]}:${tlsPort}`,
    ca,
    issueCert: (cn, o = {}) =>
      ca.issue(`client-${cn}-${crypto.randomUUID().slice(0, 6)}`, {
        spiffeId: o.spiffeId ?? `spiffe://${TEST_TRUST_DOMAIN}/robot/${cn}`,
        dnsNames: [cn],
      }),
    async restart() {
      await stop();
      await start();
    },
    async kill9() {
      if (daemon && !exited) {
        // Our own child, by the pid we spawned (never by name).
        Deno.kill(daemon.pid, "SIGKILL");
        await daemon.exited;
      }
      exited = true;
    },
    start,
    async stop() {
      await stop();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
    running: () => !exited,
    pid: () => (daemon && !exited ? daemon.pid : undefined),
    logTail,
  };
}
