/**
 * A control host played by hand, for robot-host tests: a REAL spire-server (v1.13.3) whose
 * config the test writes itself (join_token, and x509pop with a factory CA when asked), a REAL
 * Mosquitto whose certificate is an X.509 SVID minted by that server, and the registration steps
 * `k8s4r robot add` will automate (phase 2): token generate, entry create with `-dns <robotId>`
 * (the CN rule), bundle show, and the enrollment file.
 *
 * A subscriber on the broker's loopback password listener plays the fleet server: it records
 * the register messages robots send, so "the robot connected" is seen on the broker's side.
 */
import { join } from "node:path";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { bufferIo } from "../../src/cli/io.ts";
import {
  brokerSpiffeId,
  fleetServerSpiffeId,
  nodeSpiffeId,
  robotDnsNames,
  robotSpiffeId,
} from "../../src/fleet/ids.ts";
import { type Enrollment, writeEnrollmentFile } from "../../src/fleet/enrollment.ts";
import { decodeUp, type UpMessage } from "../../src/mqtt/messages.ts";
import { realRunner, waitFor } from "../../src/process/mod.ts";
import { parseCsrPem } from "../../src/spiffe/csr.ts";
import { TestCa } from "../../src/spiffe/testing/test_ca.ts";
import {
  SpireServerCli,
  type SpireServerDaemon,
  startSpireServer,
} from "../../src/spire/server.ts";
import { startTestBroker, type TestBroker } from "./broker.ts";
import { freePort } from "./ports.ts";
import { spireBinaries } from "./spire.ts";

export const TD = "k8s4r.example.org";

export interface ControlHostOptions {
  /** Also run the x509pop NodeAttestor, trusting a throwaway factory CA. */
  x509pop?: boolean;
  /** Where the SPIRE agent API and the broker's mTLS listener listen. Default 127.0.0.1. */
  bindAddress?: string;
  /** Agent SVID lifetime (SPIRE's agent_ttl). Default 1h. */
  agentTtl?: string;
}

export interface ControlHost {
  dir: string;
  spirePort: number;
  address: string;
  cli: SpireServerCli;
  bundlePem: string;
  broker: TestBroker;
  /** The factory CA (x509pop only). */
  factory?: TestCa;
  /** Registers seen on the broker, by robot id. */
  registers: Map<string, UpMessage[]>;
  serverLog(): Promise<string>;
  /** Node alias + workload entry (`-dns robotId`), a join token, and the enrollment file. */
  addJoinTokenRobot(robotId: string, file: string, ttlSeconds?: number): Promise<Enrollment>;
  /** Node alias by CN + workload entry; the factory CA signs the robot's CSR. */
  addX509popRobot(robotId: string, csrPem: string, file: string): Promise<Enrollment>;
  waitForRegister(robotId: string, count: number, timeoutMs?: number): Promise<void>;
  stop(): Promise<void>;
}

function serverConf(o: {
  dir: string;
  address: string;
  port: number;
  agentTtl: string;
  factoryCaFile?: string;
}): string {
  return `server {
  bind_address = "${o.address}"
  bind_port = "${o.port}"
  socket_path = "${o.dir}/s/api.sock"
  trust_domain = "${TD}"
  data_dir = "${o.dir}/server"
  log_level = "INFO"
  default_x509_svid_ttl = "1h"
  agent_ttl = "${o.agentTtl}"
  ca_ttl = "24h"
  experimental {
    cache_reload_interval = "500ms"
  }
}

plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = "${o.dir}/server/datastore.sqlite3"
    }
  }

  NodeAttestor "join_token" {
    plugin_data {}
  }
${
    o.factoryCaFile
      ? `
  NodeAttestor "x509pop" {
    plugin_data {
      ca_bundle_path = "${o.factoryCaFile}"
    }
  }
`
      : ""
  }
  KeyManager "disk" {
    plugin_data {
      keys_path = "${o.dir}/server/keys.json"
    }
  }
}
`;
}

export async function startControlHost(opts: ControlHostOptions = {}): Promise<ControlHost> {
  const bins = await spireBinaries();
  const address = opts.bindAddress ?? "127.0.0.1";
  // Short: the robot's Workload API socket lives under a temp dir too (107-byte limit).
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-ch-" });
  const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner, cwd: dir });
  const spirePort = freePort();
  let server: SpireServerDaemon | undefined;
  let broker: TestBroker | undefined;
  let sub: MqttClient | undefined;
  const registers = new Map<string, UpMessage[]>();
  try {
    let factory: TestCa | undefined;
    let factoryCaFile: string | undefined;
    if (opts.x509pop) {
      factory = TestCa.create({
        trustDomain: "factory.invalid",
        commonName: "k8s4r test factory CA",
      });
      factoryCaFile = join(dir, "factory-ca.pem");
      await Deno.writeTextFile(factoryCaFile, factory.rootPem);
    }
    const confFile = join(dir, "server.conf");
    await Deno.writeTextFile(
      confFile,
      serverConf({ dir, address, port: spirePort, agentTtl: opts.agentTtl ?? "1h", factoryCaFile }),
    );
    server = await startSpireServer(io, {
      bin: bins.server,
      configFile: confFile,
      cwd: dir,
      socketPath: `${dir}/s/api.sock`,
      logFile: join(dir, "spire-server.log"),
      pidFile: join(dir, "spire-server.pid"),
    });
    const cli = new SpireServerCli(realRunner, bins.server, server.socketPath);
    const bundlePem = await cli.bundlePem();
    await Deno.writeTextFile(join(dir, "bundle.pem"), bundlePem);
    // The broker's certificate is an SVID of this server, as broker-identity gets it.
    const minted = await cli.mintX509({
      spiffeId: brokerSpiffeId(TD),
      dnsNames: ["localhost", address],
      ttlSeconds: 3600,
    });
    await Deno.writeTextFile(join(dir, "broker.crt"), minted.certPem);
    await Deno.writeTextFile(join(dir, "broker.key"), minted.keyPem, { mode: 0o600 });
    broker = await startTestBroker({
      pki: {
        caFile: join(dir, "bundle.pem"),
        certFile: join(dir, "broker.crt"),
        keyFile: join(dir, "broker.key"),
        brokerSpiffeId: brokerSpiffeId(TD),
      },
      tlsBind: address,
    });
    const b = broker;
    sub = mqtt.connect(b.plainUrl, {
      username: b.server.username,
      password: b.server.password,
      clientId: `test-fleet-server-${crypto.randomUUID().slice(0, 8)}`,
      protocolVersion: 5,
      reconnectPeriod: 200,
    });
    sub.on("message", (topic, payload) => {
      const d = decodeUp(topic, new Uint8Array(payload));
      if (d.ok && d.message.type === "register") {
        const list = registers.get(d.message.robotId) ?? [];
        list.push(d.message);
        registers.set(d.message.robotId, list);
      }
    });
    const s = sub;
    await new Promise<void>((resolve, reject) => {
      s.once(
        "connect",
        () =>
          s.subscribe("k8s4r/robots/+/up/register", { qos: 1 }, (e) => e ? reject(e) : resolve()),
      );
      s.once("error", reject);
    });

    const enrollment = (robotId: string, attestation: Enrollment["attestation"]): Enrollment => ({
      version: 1,
      robotId,
      trustDomain: TD,
      spireServerAddress: `${address}:${spirePort}`,
      brokerUrl: `ssl://${address}:${b.tlsPort}`,
      brokerSpiffeId: brokerSpiffeId(TD),
      fleetServerSpiffeId: fleetServerSpiffeId(TD),
      trustBundle: bundlePem,
      createdAt: new Date(),
      attestation,
    });
    const workloadEntry = (robotId: string) =>
      cli.createEntry({
        spiffeId: robotSpiffeId(TD, robotId),
        parentId: nodeSpiffeId(TD, robotId),
        selectors: [`unix:uid:${Deno.uid()}`],
        dnsNames: robotDnsNames(robotId), // the CN rule: CN = robot id = MQTT username
      });
    const srv = server;
    return {
      dir,
      spirePort,
      address,
      cli,
      bundlePem,
      broker: b,
      factory,
      registers,
      serverLog: () => Deno.readTextFile(join(dir, "spire-server.log")).catch(() => ""),
      async addJoinTokenRobot(robotId, file, ttlSeconds = 600) {
        const token = await cli.generateJoinToken(nodeSpiffeId(TD, robotId), ttlSeconds);
        await workloadEntry(robotId);
        const e = enrollment(robotId, {
          type: "join_token",
          token: token.value,
          expiresAt: token.expiresAt,
        });
        await writeEnrollmentFile(file, e);
        return e;
      },
      async addX509popRobot(robotId, csrPem, file) {
        const csr = parseCsrPem(csrPem);
        if (csr.commonName !== robotId) throw new Error(`CSR is for ${csr.commonName}`);
        const cert = factory!.issueForPublicKey(csr.publicKey, {
          commonName: robotId,
          keyUsage: ["digitalSignature"],
          extKeyUsage: ["clientAuth"],
          ttlSeconds: 86_400,
        });
        // The node alias: any agent whose x509pop certificate says CN=<robotId>.
        await realRunner.output(bins.server, [
          "entry",
          "create",
          "-node",
          "-spiffeID",
          nodeSpiffeId(TD, robotId),
          "-selector",
          `x509pop:subject:cn:${robotId}`,
          "-socketPath",
          srv.socketPath,
        ]);
        await workloadEntry(robotId);
        const e = enrollment(robotId, {
          type: "x509pop",
          certificate: cert.chainPem,
          expiresAt: new Date(cert.certificate.validTo),
        });
        await writeEnrollmentFile(file, e);
        return e;
      },
      async waitForRegister(robotId, count, timeoutMs = 60_000) {
        await waitFor(() => (registers.get(robotId)?.length ?? 0) >= count, {
          timeoutMs,
          intervalMs: 100,
          what: `register #${count} of ${robotId} on the broker`,
        });
      },
      async stop() {
        sub?.end(true);
        await b.stop();
        await srv.stop();
        await Deno.remove(dir, { recursive: true }).catch(() => {});
      },
    };
  } catch (err) {
    sub?.end(true);
    await broker?.stop().catch(() => {});
    await server?.stop().catch(() => {});
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    throw err;
  }
}
