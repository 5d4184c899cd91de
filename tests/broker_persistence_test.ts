/**
 * Regression: the broker keeps the QoS 1 messages queued for an offline persistent session (the
 * fleet server's) across a kill -9 and restart, with the configuration k8s4r generates.
 *
 * Mosquitto 2.0.21 (bookworm-backports) loses them with `per_listener_settings true`; 2.0.11
 * keeps them. Why, in Mosquitto's source: since 2.0.12 (commit 79542158, "Fix max_connections
 * option not being correctly counted") closing a client's socket sets its `listener` to NULL,
 * and with per_listener_settings `mosquitto_acl_check` denies every check of a client without a
 * listener (src/security.c). So a message for an offline persistent session is dropped when it
 * is published (it is not even in the next autosave), and a session restored after a restart
 * fails too ("Failed to associate persisted user ... with ACLs, likely due to changed ports").
 * So k8s4r's config uses global auth settings. The same repro runs against the phase-1 style
 * config as the control: on 2.0.21 it must lose the message (the check can see a loss), on
 * 2.0.11 keep it.
 *
 * A loss is seen without a timer: after the restart a marker is published to the same topic, and
 * the broker delivers a session's messages in order, so the marker arriving first means the
 * queued message is gone.
 */
import assert from "node:assert/strict";
import mqtt from "mqtt";
import { join } from "node:path";
import { bufferIo } from "../src/cli/io.ts";
import { generatePassword, hashPassword } from "../src/mqtt/broker_config.ts";
import { probeMqtt } from "../src/mqtt/probe.ts";
import { type Daemon, realRunner, waitFor } from "../src/process/mod.ts";
import { findMosquitto } from "../src/spire/binaries.ts";
import { startTestBroker } from "./helpers/broker.ts";
import { freePort } from "./helpers/ports.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

interface BrokerUnderTest {
  port: number;
  username: string;
  password: string;
  dbFile: string;
  kill9(): Promise<void>;
  start(): Promise<void>;
  log(): Promise<string>;
}

/**
 * The repro: queue a QoS 1 message for an offline persistent session, let an autosave happen,
 * kill -9, restart. Also says whether that save held the message.
 */
async function queuedMessageSurvives(
  b: BrokerUnderTest,
): Promise<{ survived: boolean; savedBeforeKill: boolean }> {
  const url = `mqtt://127.0.0.1:${b.port}`;
  const login = { username: b.username, password: b.password, protocolVersion: 5 as const };
  const topic = "k8s4r/robots/robot-001/up/heartbeat";
  const session = {
    ...login,
    clientId: `srv-${crypto.randomUUID().slice(0, 6)}`,
    clean: false,
    properties: { sessionExpiryInterval: 600 },
    reconnectPeriod: 0,
  };
  const sub = await mqtt.connectAsync(url, session);
  await sub.subscribeAsync(topic, { qos: 1 });
  await sub.endAsync();
  const unique = `queued-${crypto.randomUUID()}`;
  const pub = await mqtt.connectAsync(url, { ...login, reconnectPeriod: 0 });
  await pub.publishAsync(topic, unique, { qos: 1 });
  await pub.endAsync();
  // An autosave after the PUBACK (every second): the file is newer than the acknowledgement.
  const acked = Date.now();
  await waitFor(
    async () => ((await Deno.stat(b.dbFile).catch(() => undefined))?.mtime?.getTime() ?? 0) > acked,
    { timeoutMs: 15_000, intervalMs: 50, what: "an autosave after the publish" },
  );
  const savedBeforeKill = (await Deno.readTextFile(b.dbFile)).includes(unique);
  await b.kill9();
  await b.start();
  const got: string[] = [];
  const marker = `marker-${crypto.randomUUID()}`;
  const again = mqtt.connect(url, session);
  try {
    again.on("message", (_t, p) => got.push(p.toString()));
    await new Promise<void>((resolve, reject) => {
      again.once("connect", () => resolve());
      again.once("error", reject);
    });
    const p2 = await mqtt.connectAsync(url, { ...login, reconnectPeriod: 0 });
    await p2.publishAsync(topic, marker, { qos: 1 });
    await p2.endAsync();
    await waitFor(() => got.includes(marker), {
      timeoutMs: 15_000,
      intervalMs: 50,
      what: "the marker published after the restart",
    }).catch(async (err) => {
      throw new Error(`${err.message}\nbroker log:\n${await b.log()}`);
    });
  } finally {
    again.end(true);
  }
  const survived = got.indexOf(unique) >= 0 && got.indexOf(unique) < got.indexOf(marker);
  return { survived, savedBeforeKill };
}

Deno.test({
  name:
    "broker: queued QoS 1 messages of a persistent session survive kill -9 with k8s4r's config (global auth)",
  ...opts,
  async fn() {
    const b = await startTestBroker();
    try {
      const conf = await Deno.readTextFile(b.files.config);
      assert.doesNotMatch(conf, /^per_listener_settings/m);
      const { survived, savedBeforeKill } = await queuedMessageSurvives({
        port: b.plainPort,
        ...b.server,
        dbFile: join(b.files.persistenceDir, "mosquitto.db"),
        kill9: () => b.kill9(),
        start: () => b.start(),
        log: () => b.logTail(),
      });
      assert.equal(savedBeforeKill, true, "the autosave did not hold the queued message");
      assert.equal(survived, true, `lost across kill -9:\n${await b.logTail()}`);
    } finally {
      await b.stop();
    }
  },
});

Deno.test({
  name:
    "broker: control: with per_listener_settings true, 2.0.21 loses the queued message (2.0.11 keeps it)",
  ...opts,
  async fn() {
    const { version, path } = await findMosquitto(
      bufferIo({ env: Deno.env.toObject(), runner: realRunner }),
    );
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-plsbug-" });
    const port = freePort();
    const password = generatePassword();
    const files = {
      conf: join(dir, "m.conf"),
      passwd: join(dir, "passwd"),
      acl: join(dir, "acl"),
      data: join(dir, "p"),
      log: join(dir, "mosquitto.log"),
    };
    await Deno.mkdir(files.data);
    await Deno.writeTextFile(files.passwd, `srv:${hashPassword(password)}\n`, { mode: 0o600 });
    await Deno.writeTextFile(files.acl, "user srv\ntopic readwrite k8s4r/#\n", { mode: 0o600 });
    // The shape of the phase-1 config: auth settings scoped to the listener.
    await Deno.writeTextFile(
      files.conf,
      [
        ...(Deno.uid() === 0 ? ["user root"] : []),
        "per_listener_settings true",
        "persistence true",
        `persistence_location ${files.data}/`,
        "autosave_interval 1",
        "autosave_on_changes false",
        `log_dest file ${files.log}`,
        `listener ${port} 127.0.0.1`,
        "allow_anonymous false",
        `password_file ${files.passwd}`,
        `acl_file ${files.acl}`,
        "",
      ].join("\n"),
    );
    let daemon: Daemon | undefined;
    const start = async () => {
      daemon = await realRunner.spawn({
        name: "mosquitto",
        cmd: path,
        args: ["-c", files.conf],
        logFile: join(dir, "stdout.log"),
        ready: async () =>
          (await probeMqtt({ port, username: "srv", password, timeoutMs: 1000 })).ok,
        readyTimeoutMs: 15_000,
      });
    };
    try {
      await start();
      const { survived, savedBeforeKill } = await queuedMessageSurvives({
        port,
        username: "srv",
        password,
        dbFile: join(files.data, "mosquitto.db"),
        async kill9() {
          Deno.kill(daemon!.pid, "SIGKILL"); // our own child, by its pid
          await daemon!.exited;
        },
        start,
        log: () => Deno.readTextFile(files.log).catch(() => ""),
      });
      console.log(
        `  mosquitto ${version}, per_listener_settings true: saved before the kill=${savedBeforeKill}, delivered after it=${survived}`,
      );
      if (version === "2.0.21") {
        assert.equal(survived, false, "2.0.21 kept it: the upstream bug is gone?");
      } else if (version === "2.0.11") {
        assert.equal(survived, true, "2.0.11 lost it");
      } else {
        console.log(`  (no expectation recorded for ${version})`);
      }
    } finally {
      await daemon?.stop().catch(() => {});
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
