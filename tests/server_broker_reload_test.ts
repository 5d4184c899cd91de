/**
 * The fleet server's own persistent session and a broker reload (SIGHUP, what broker-identity does
 * on every broker SVID renewal), against a REAL Mosquitto.
 *
 * The reload "disconnects" again every away session that fails the username/password check
 * (tests/agent_broker_reload_test.ts has the whole story): that double-books it in the
 * session-expiry list, and once the client is back the stale entry makes Mosquitto expire the
 * next client's live session, or crash. The fleet server keeps a persistent session (7 days) and
 * is away during every restart. On the password listener its away session keeps its username and
 * password, which pass the check with global auth settings (one password file for the broker, as
 * k8s4r writes it): the reload leaves it alone. With `per_listener_settings true` an away client
 * has no listener (since Mosquitto 2.0.12) and fails the check: the server's session was
 * double-booked too (this test failed on that configuration).
 *
 * Positive control, in the same reload: a second server logging in over `mqtts://` with an SVID
 * (its username is its certificate's CN, it has no password) is away too, and the reload does
 * "disconnect" it again. That one is not brought back: its return would free the session the
 * stale entry points to.
 */
import assert from "node:assert/strict";
import mqtt from "mqtt";
import { waitFor } from "../src/process/mod.ts";
import { probeMqtt } from "../src/mqtt/probe.ts";
import { upTopic } from "../src/fleet/topics.ts";
import { TaskSigner } from "../src/mqtt/signed.ts";
import { FleetServer } from "../src/server/fleet_server.ts";
import { svidTlsProvider } from "../src/server/svid_tls.ts";
import { StaticX509Source } from "../src/spiffe/source.ts";
import { parseX509SvidPem } from "../src/spiffe/svid.ts";
import { X509Bundle, X509BundleSet } from "../src/spiffe/bundle.ts";
import { startTestBroker, TEST_TRUST_DOMAIN, type TestBroker } from "./helpers/broker.ts";
import { registerMsg as register } from "./helpers/proto_robot.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };
const TLS_SERVER = "k8s4r-server-tls";

/** A robot's connection without a session (as the agent's default), registered. */
async function robot(b: TestBroker, id: string) {
  const c = await b.issueCert(id);
  const client = await mqtt.connectAsync(b.tlsUrl, {
    key: c.key,
    cert: c.cert,
    ca: c.ca,
    servername: "localhost",
    rejectUnauthorized: true,
    clientId: id,
    protocolVersion: 5,
    reconnectPeriod: 0,
    connectTimeout: 5000,
  });
  await client.publishAsync(upTopic(id, "register"), register(id), { qos: 1 });
  return client;
}

function brokerLog(b: TestBroker): string {
  return Deno.readTextFileSync(b.files.logFile);
}

function disconnectLines(b: TestBroker, clientId: string): number {
  return brokerLog(b).split("\n").filter((l) => l.endsWith(`Client ${clientId} disconnected.`))
    .length;
}

/** The broker's clock in its log (`2026-01-01T10:00:00: ...`), in whole seconds. */
function lastLogSecond(b: TestBroker): number {
  const lines = brokerLog(b).trim().split("\n");
  const m = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d):/.exec(lines[lines.length - 1]);
  return m ? Date.parse(`${m[1]}Z`) / 1000 : 0;
}

/**
 * Waits until the broker has run its once-a-second session-expiry check at least once after
 * now: a probe connection logged two broker seconds later (it also shows the broker is alive).
 */
async function brokerSecondsPassed(b: TestBroker): Promise<void> {
  await probeMqtt({ port: b.plainPort, ...b.server, timeoutMs: 2000 });
  const since = lastLogSecond(b);
  await waitFor(async () => {
    if (!b.running()) {
      throw new Error(`mosquitto died (exit ${b.exitCode()}): ${await b.logTail()}`);
    }
    await probeMqtt({ port: b.plainPort, ...b.server, timeoutMs: 2000 });
    return lastLogSecond(b) >= since + 2;
  }, { timeoutMs: 15_000, intervalMs: 200, what: "two seconds of the broker's clock" });
}

Deno.test(
  "broker reload during a fleet server restart: the server's session on the password listener " +
    "is left alone (kept, not double-booked), nobody is expired; control: an away mqtts:// " +
    "server is re-disconnected",
  opts,
  async () => {
    const b = await startTestBroker({ tlsAdminUsers: [TLS_SERVER] });
    const dataDir = await Deno.makeTempDir({ prefix: "k8s4r-srv-" });
    const tlsDataDir = await Deno.makeTempDir({ prefix: "k8s4r-srv-tls-" });
    const lines: string[] = [];
    const logger = {
      info: (m: string) => lines.push(m),
      warn: (m: string) => lines.push(m),
    };
    const clients: mqtt.MqttClient[] = [];
    let server: FleetServer | undefined;
    try {
      const c = await b.issueCert(TLS_SERVER, {
        spiffeId: `spiffe://${TEST_TRUST_DOMAIN}/${TLS_SERVER}`,
      });
      const source = new StaticX509Source(
        parseX509SvidPem(c.cert, c.key),
        new X509BundleSet([X509Bundle.fromPem(TEST_TRUST_DOMAIN, c.ca)]),
      );
      // Both sign with this SVID (they send no task here; a server always has a signer).
      const fleet = { signer: new TaskSigner(source) };
      const start = () =>
        FleetServer.start({
          brokerUrl: b.plainUrl,
          username: b.server.username,
          password: b.server.password,
          dataDir,
          http: false,
          fleet,
          reconnectPeriodMs: 200,
          logger,
        });
      const tlsServer = await FleetServer.start({
        brokerUrl: b.tlsUrl,
        clientId: TLS_SERVER,
        tls: svidTlsProvider(source, b.brokerSpiffeId),
        dataDir: tlsDataDir,
        http: false,
        fleet,
        reconnectPeriodMs: 200,
      });
      server = await start();
      await server.waitConnected(10_000);
      await tlsServer.waitConnected(10_000);
      clients.push(await robot(b, "robot-001"));
      await waitFor(async () => (await server!.registry.getRobot("robot-001")) !== undefined, {
        timeoutMs: 10_000,
        what: "robot-001's register",
      });

      // Both servers go away (a restart), keeping their sessions.
      await server.close();
      server = undefined;
      await tlsServer.close();
      await waitFor(
        () => disconnectLines(b, b.server.username) === 1 && disconnectLines(b, TLS_SERVER) === 1,
        { timeoutMs: 10_000, what: "both servers' DISCONNECT" },
      );
      // What a robot says meanwhile waits in the server's session.
      clients.push(await robot(b, "robot-002"));

      await b.reloadCertificate();
      // Control: the reload went through the away sessions; the mqtts:// one fails the check.
      await waitFor(() => disconnectLines(b, TLS_SERVER) === 2, {
        timeoutMs: 10_000,
        what: `the reload to "disconnect" ${TLS_SERVER} again (broker log: ${brokerLog(b)})`,
      });
      assert.equal(disconnectLines(b, b.server.username), 1, brokerLog(b));

      // Back: its session was kept, with what robot-002 said while it was away.
      server = await start();
      await server.waitConnected(10_000);
      assert.ok(
        lines.some((l) => /session present: true/.test(l)),
        `the server's session was not kept: ${lines.join(" | ")}`,
      );
      await waitFor(async () => (await server!.registry.getRobot("robot-002")) !== undefined, {
        timeoutMs: 10_000,
        what: "robot-002's register, queued while the server was away",
      });
      // New sessions after its return (what a stale entry would hit): nobody is expired.
      await clients.shift()!.endAsync();
      clients.push(await robot(b, "robot-001"));
      await brokerSecondsPassed(b);
      assert.doesNotMatch(brokerLog(b), /Expiring client/);
      assert.ok(clients.every((c) => c.connected), "a robot's connection was dropped");
      assert.ok(server.connected());
      assert.equal(disconnectLines(b, b.server.username), 1, brokerLog(b));
    } finally {
      for (const c of clients) await c.endAsync(true).catch(() => {});
      await server?.close();
      await b.stop();
      await Deno.remove(dataDir, { recursive: true });
      await Deno.remove(tlsDataDir, { recursive: true });
    }
  },
);
