/**
 * What the tests that run the real agent CLI against a real broker (tests/agent_crash_test.ts,
 * tests/task_security_test.ts; the in-process agents of tests/agent_mqtt_test.ts and
 * tests/helpers/agent_fleet.ts write their plugins.yaml here too) set up alike: the fleet server's stand-in on the broker's
 * password listener, signers with SVIDs of the broker's test CA, the robot's SVID in a
 * FakeWorkloadApi, the agent's plugins.yaml, and the sweep that kills the tasks a test left.
 */
import { join } from "node:path";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { TEST_TRUST_DOMAIN, type TestBroker } from "./broker.ts";
import type { FakeWorkloadApi } from "../../src/spiffe/testing/fake_workload_api.ts";
import { decodeUp, type UpMessage } from "../../src/mqtt/messages.ts";
import { TaskSigner } from "../../src/mqtt/signed.ts";
import { StaticX509Source } from "../../src/spiffe/source.ts";
import { parseX509SvidPem } from "../../src/spiffe/svid.ts";
import { X509BundleSet } from "../../src/spiffe/bundle.ts";
import { robotSpiffeId } from "../../src/fleet/ids.ts";
import { killInterrupted, TaskJournal } from "../../src/agent/task_journal.ts";

/**
 * A client on the password listener (the fleet server's login), subscribed to `robotId`'s up
 * topics (QoS 1) before it resolves. Every message must pass the server's own validator (a
 * throw otherwise); `onMessage` gets the decoded ones.
 */
export async function connectUpListener(
  broker: TestBroker,
  robotId: string,
  clientIdPrefix: string,
  onMessage: (m: UpMessage) => void,
  /** More mqtt.js options (a persistent session: `clean: false` and its expiry). */
  more: mqtt.IClientOptions = {},
): Promise<MqttClient> {
  const client = mqtt.connect(broker.plainUrl, {
    username: broker.server.username,
    password: broker.server.password,
    clientId: `${clientIdPrefix}-${crypto.randomUUID().slice(0, 8)}`,
    protocolVersion: 5,
    reconnectPeriod: 100,
    ...more,
  });
  client.on("message", (topic, payload) => {
    const d = decodeUp(topic, new Uint8Array(payload));
    if (!d.ok) throw new Error(`${topic}: ${d.reason}: ${d.error}`);
    onMessage(d.message);
  });
  await new Promise<void>((resolve, reject) => {
    client.once(
      "connect",
      () =>
        client.subscribe(
          `k8s4r/robots/${robotId}/up/#`,
          { qos: 1 },
          (err) => err ? reject(err) : resolve(),
        ),
    );
    client.once("error", reject);
  });
  return client;
}

/** A TaskSigner holding an SVID of the broker's test CA (`dns` as its DNS name, if any). */
export function testSigner(broker: TestBroker, spiffeId: string, dns?: string): TaskSigner {
  const c = broker.ca.ca.issue({ spiffeId, dnsNames: dns ? [dns] : undefined });
  return new TaskSigner(
    new StaticX509Source(parseX509SvidPem(c.chainPem, c.keyPem), new X509BundleSet()),
  );
}

/** Serves `robotId`'s SVID (DNS robotId; the CA's default TTL unless given) and the bundle. */
export function issueRobotSvid(
  broker: TestBroker,
  fake: FakeWorkloadApi,
  robotId: string,
  ttlSeconds?: number,
): void {
  const c = broker.ca.ca.issue({
    spiffeId: robotSpiffeId(TEST_TRUST_DOMAIN, robotId),
    dnsNames: [robotId],
    ttlSeconds,
  });
  fake.setX509Svids([c], { [TEST_TRUST_DOMAIN]: c.bundleDer });
}

/**
 * `dir/plugins.yaml`: `spire:` with the test trust domain and data under dir/data, then the
 * given lines of each section (indented as in the file); a section not given is left out.
 */
export async function writeAgentPlugins(
  dir: string,
  o: { spire?: string[]; mqtt?: string[]; tasks?: string[] },
): Promise<void> {
  await Deno.writeTextFile(
    join(dir, "plugins.yaml"),
    [
      "spire:",
      `  trustDomain: ${TEST_TRUST_DOMAIN}`,
      `  dataDir: ${join(dir, "data")}`,
      ...(o.spire ?? []),
      ...(o.mqtt ? ["mqtt:", ...o.mqtt] : []),
      ...(o.tasks ? ["tasks:", ...o.tasks] : []),
      "",
    ].join("\n"),
  );
}

/** Whatever a test got to, no task it started survives it (each checked by its start time). */
export async function killJournalTasks(stateDir: string): Promise<void> {
  for (const rec of await new TaskJournal(stateDir).interrupted().catch(() => [])) {
    await killInterrupted(rec, 200).catch(() => {});
  }
}
