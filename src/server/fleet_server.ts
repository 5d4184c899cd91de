/**
 * The fleet server process: an MQTT client (mqtt.js) with a persistent session, the registry,
 * the sweeper and the HTTPS API (https.ts, http_api.ts), wired around `FleetService`.
 *
 * - Plain `mqtt://127.0.0.1:1883` with a username/password (the loopback listener), or
 *   `mqtts://` with an X.509 SVID (an `MqttTlsProvider`, e.g. built from an `X509Source`).
 * - Persistent session: fixed client id, `clean: false`, MQTT 5 session expiry of 7 days, so
 *   QoS 1 messages robots publish while the server is down are queued by the broker.
 * - Subscribes QoS 1 to `k8s4r/robots/+/up/#` (or `$share/k8s4r/...` with shared
 *   subscriptions) on EVERY connect, not only the first.
 * - A message is acknowledged (PUBACK) only after its registry write is committed (SQLite WAL,
 *   synchronous=FULL; or a PostgreSQL COMMIT). Messages are applied in batches: whatever
 *   arrived in one turn of the event loop, or while the previous batch was being committed,
 *   shares one commit, then their PUBACKs go out in order. One batch is committed at a time.
 *   A message whose write fails is never acknowledged: the connection is cycled, and the
 *   broker delivers it again from the persistent session (it was never acknowledged).
 * - While disconnected, robots' states are "unknown" and the sweeper marks nobody offline
 *   (FleetService.linkDown/linkUp).
 * - close() is bounded: dispatches still waiting for their PUBACK get `closeDrainMs`, then the
 *   connection is dropped (the tasks stay pending/dispatched in the registry and are sent
 *   again by the next start).
 */
import type { PeerCertificate } from "node:tls";
import mqtt from "mqtt";
import type { IClientOptions, IPublishPacket, MqttClient } from "mqtt";
import {
  SERVER_SUBSCRIPTION,
  serverProbeTopic,
  SHARED_SERVER_SUBSCRIPTION,
} from "../fleet/topics.ts";
import {
  type FleetOptions,
  FleetService,
  type Incoming,
  type Logger,
  silentLogger,
} from "./fleet.ts";
import type { X509BundleSource } from "../spiffe/bundle.ts";
import { allowedHostNames } from "./auth.ts";
import { createHandler } from "./http_api.ts";
import { type HttpsApi, serveHttps, type ServerTlsProvider } from "./https.ts";
import type { Registry } from "./registry.ts";
import type { PostgresConfig } from "./registry_postgres.ts";
import type { RolesSource } from "./roles.ts";
import { openRegistry } from "./storage.ts";
import { readSecretFile } from "../fs/secret.ts";

export const SERVER_CLIENT_ID = "k8s4r-server";
export const SESSION_EXPIRY_SECONDS = 7 * 24 * 3600;

/** TLS material for `mqtts://`, kept fresh across SVID rotations. */
export interface MqttTlsMaterial {
  key: string | Uint8Array;
  cert: string | Uint8Array;
  ca: string | Uint8Array | (string | Uint8Array)[];
  /** Authorizes the broker (e.g. by SPIFFE ID); returns an Error to refuse it. */
  checkServerIdentity?: (host: string, cert: PeerCertificate) => Error | undefined;
}

export interface MqttTlsProvider {
  current(): MqttTlsMaterial;
  /** Called after every rotation; returns an unsubscribe function. */
  onUpdate?(cb: () => void): () => void;
}

/** The HTTPS API: where it listens, its certificate, and who may use it. */
export interface HttpsOptions {
  hostname: string;
  port: number;
  /** The server's SVID and the bundle (follows rotation). */
  tls: ServerTlsProvider;
  /** What client certificates must chain to (the server's X509Source). */
  bundles: X509BundleSource;
  roles: RolesSource;
  /** Operators are `spiffe://<trustDomain>/operator/<name>`. */
  trustDomain: string;
  /** The DNS names of the server's current certificate (allowed in Host and Origin). */
  dnsNames: () => readonly string[];
  /** Every address of this machine (allowed in Host when bound to all of them). */
  interfaceAddresses?: readonly string[];
  /** Open connections at most (default DEFAULT_MAX_CONNECTIONS of https.ts). */
  maxConnections?: number;
}

export interface FleetServerOptions {
  brokerUrl: string;
  username?: string;
  password?: string;
  tls?: MqttTlsProvider;
  clientId?: string;
  sharedSubscription?: boolean;
  /** The SQLite registry's directory (unused with `postgres`). */
  dataDir: string;
  /** Keep the registry in PostgreSQL instead of SQLite. */
  postgres?: PostgresConfig;
  /** false: no HTTP API (tests of the MQTT side). */
  http: HttpsOptions | false;
  fleet?: FleetOptions;
  /** Default 1000 ms. */
  sweepIntervalMs?: number;
  /** How often the server probes the broker's delivery through its own topic. Default 500 ms. */
  probeIntervalMs?: number;
  /** Default 1000 ms. */
  reconnectPeriodMs?: number;
  logger?: Logger;
  version?: string;
  /** Called when the broker refuses our login: retrying cannot help. */
  onFatal?: (err: Error) => void;
  /** How long close() waits for dispatches in flight and for the DISCONNECT. Default 2000 ms. */
  closeDrainMs?: number;
}

export interface FleetServerState {
  connected: boolean;
  connects: number;
  lastError?: string;
}

/** CONNACK codes that mean "your credentials are wrong", in MQTT 3.1.1 and 5. */
const AUTH_CODES = new Set([4, 5, 134, 135]);

/**
 * Messages applied per commit at most (a batch is otherwise what arrived since the last one).
 * While that many wait, mqtt.js is not given the next packet (backpressure).
 */
const MAX_BATCH = 1000;

/**
 * Passed to mqtt.js's `handleMessage` callback so that it does NOT send the PUBACK itself (it
 * sends one only on a callback without an error, and then goes on with the next packet). We send
 * it after the commit instead. Checked against mqtt@5.16.0 (src/lib/handlers/publish.ts).
 */
const ACK_LATER = new Error("acknowledged after the registry commit");

interface Received extends Incoming {
  qos: number;
  messageId?: number;
  /** The connection it came on: a PUBACK on another connection would ack another message. */
  stream: unknown;
}

/**
 * mqtt.js has no public "acknowledge this message now" call: its PUBACK goes out when
 * `handleMessage` calls back, which also holds the next packet until then (one commit per
 * message). `_sendPacket` is what mqtt.js itself uses for that PUBACK.
 */
function pubackSender(client: MqttClient): (messageId: number) => void {
  const c = client as unknown as { _sendPacket?: (packet: object) => void };
  if (typeof c._sendPacket !== "function") {
    throw new Error("mqtt.js: MqttClient._sendPacket is missing (mqtt is pinned to 5.16.0)");
  }
  return (messageId) => c._sendPacket!({ cmd: "puback", messageId, reasonCode: 0 });
}

export class FleetServer {
  readonly state: FleetServerState = { connected: false, connects: 0 };
  private sweepTimer?: ReturnType<typeof setInterval>;
  private probeTimer?: ReturnType<typeof setInterval>;
  private unsubscribeTls?: () => void;
  private closed = false;
  private connectWaiters: (() => void)[] = [];
  /** Received, not yet committed. */
  private batch: Received[] = [];
  private flushScheduled = false;
  /** The commit-then-ack loop, while it runs (one batch at a time). */
  private flushing?: Promise<void>;
  private sweeping?: Promise<void>;
  /** A write failed: this connection is being dropped; nothing more is applied or acked on it. */
  private cyclingStream?: unknown;
  private sendPuback: (messageId: number) => void;

  private constructor(
    readonly registry: Registry,
    readonly fleet: FleetService,
    readonly client: MqttClient,
    readonly http: HttpsApi | undefined,
    private readonly log: Logger,
    private readonly closeDrainMs: number,
  ) {
    this.sendPuback = pubackSender(client);
  }

  /**
   * A write failed: the connection it came on is being dropped, and nothing more is applied or
   * acknowledged on it. Tied to that connection's stream, not to the 'connect' event: mqtt.js
   * emits 'connect' only after flushing its outgoing store, and the broker's redeliveries on the
   * new connection may be handled before that.
   */
  private get cycling(): boolean {
    return this.cyclingStream !== undefined && this.cyclingStream === this.client.stream;
  }

  /** mqtt.js calls this for every PUBLISH, one at a time, before it would send the PUBACK. */
  private receive(packet: IPublishPacket, callback: (err?: Error) => void): void {
    if (this.cycling || this.closed) {
      // Not applied and not acknowledged: the broker delivers it again on the next connection.
      callback(ACK_LATER);
      return;
    }
    // The broker sends no topic aliases: we advertise no topicAliasMaximum.
    this.batch.push({
      topic: packet.topic,
      payload: packet.payload as Uint8Array,
      qos: packet.qos,
      messageId: packet.messageId,
      stream: this.client.stream,
    });
    const ack = packet.qos > 0 ? ACK_LATER : undefined;
    if (this.batch.length >= MAX_BATCH) {
      // Hold mqtt.js's parser (it waits for this callback) until this much is committed.
      void this.flush().then(() => callback(ack));
      return;
    }
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      // After the packets already parsed from the socket have been queued: one commit for all.
      setImmediate(() => void this.flush());
    }
    callback(ack);
  }

  /**
   * Commits what was received, then acknowledges it, in order; resolves when nothing received
   * before the call is left uncommitted. One batch is committed at a time: what arrives
   * meanwhile is the next batch. Never rejects.
   */
  flush(): Promise<void> {
    this.flushScheduled = false;
    if (!this.flushing) {
      this.flushing = this.drain().finally(() => {
        this.flushing = undefined;
        // Arrived between the last turn of the loop and now: the next batch.
        if (this.batch.length > 0 && !this.flushScheduled) {
          this.flushScheduled = true;
          setImmediate(() => void this.flush());
        }
      });
    }
    return this.flushing;
  }

  private async drain(): Promise<void> {
    while (this.batch.length > 0 && !this.cycling) {
      const items = this.batch.splice(0, MAX_BATCH);
      try {
        const r = await this.fleet.handleBatch(items);
        for (let i = 0; i < r.acked; i++) {
          const m = items[i];
          if (m.qos === 0 || m.messageId === undefined) continue;
          // The connection it came on is gone: the broker will deliver it again (applying a
          // message twice is harmless, see docs/PROTOCOL.md).
          if (m.stream !== this.client.stream || !this.client.connected || this.cycling) continue;
          this.sendPuback(m.messageId);
        }
        if (r.error !== undefined) this.cycle(r.error);
      } catch (err) {
        // Never let ingest take the server down. What was not acked is redelivered.
        this.log.warn(`ingest failed: ${(err as Error).message}`);
        this.cycle((err as Error).message);
      }
    }
  }

  /**
   * Drops the connection without acknowledging the message that failed (nor anything after
   * it). The session is persistent, so on reconnect the broker sends every unacknowledged
   * message again, in order.
   */
  private cycle(why: string): void {
    if (this.cycling) return;
    this.cyclingStream = this.client.stream;
    this.batch = [];
    this.state.lastError = `registry write failed: ${why}`;
    this.log.warn(`reconnecting to the broker so that it redelivers what was not written`);
    const stream = this.client.stream;
    // end() first so the PUBACKs already written reach the broker; destroy() ends the wait.
    const t = setTimeout(() => stream.destroy(), 1000);
    stream.end(() => {
      clearTimeout(t);
      stream.destroy();
    });
  }

  static async start(opts: FleetServerOptions): Promise<FleetServer> {
    const log = opts.logger ?? silentLogger;
    const registry = await openRegistry(
      opts.postgres
        ? { kind: "postgres", config: opts.postgres }
        : { kind: "sqlite", dataDir: opts.dataDir },
      { onError: (m) => log.warn(m) },
    );
    if (registry.dialect === "postgres") {
      // What "committed before PUBACK" rests on is the server's: say so when it is not durable.
      try {
        const d = await registry.durability();
        for (const [k, bad] of [["synchronous_commit", "off"], ["fsync", "off"]]) {
          if (d[k] === bad) {
            log.warn(
              `${registry.location}: ${k}=${bad}: an acknowledged message can be lost if PostgreSQL crashes`,
            );
          }
        }
      } catch (err) {
        await registry.close();
        throw err;
      }
    }
    const shared = opts.sharedSubscription ?? false;
    const clientOpts: IClientOptions = {
      clientId: opts.clientId ?? SERVER_CLIENT_ID,
      clean: false,
      protocolVersion: 5,
      properties: { sessionExpiryInterval: SESSION_EXPIRY_SECONDS },
      reconnectPeriod: opts.reconnectPeriodMs ?? 1000,
      connectTimeout: 10_000,
      keepalive: 30,
      resubscribe: false, // we subscribe ourselves on every connect
    };
    if (opts.username !== undefined) clientOpts.username = opts.username;
    if (opts.password !== undefined) clientOpts.password = opts.password;
    const url = new URL(opts.brokerUrl);
    if (url.protocol === "mqtts:") {
      if (!opts.tls) throw new Error(`${opts.brokerUrl}: mqtts:// needs an X.509 SVID source`);
      Object.assign(clientOpts, tlsOptions(opts.tls.current()));
      clientOpts.rejectUnauthorized = true;
    } else if (url.protocol !== "mqtt:") {
      throw new Error(
        `--broker-url: expected mqtt://HOST:PORT or mqtts://HOST:PORT, got ${opts.brokerUrl}`,
      );
    }

    // manualConnect: handlers are attached before the first CONNECT goes out.
    const client = mqtt.connect(opts.brokerUrl, { ...clientOpts, manualConnect: true });
    const publisher = {
      publish: async (topic: string, payload: Uint8Array) => {
        await client.publishAsync(topic, payload as Buffer, { qos: 1, retain: false });
      },
      connected: () => client.connected,
    };
    const probeTopic = serverProbeTopic(clientOpts.clientId!);
    const fleet = new FleetService(registry, publisher, {
      logger: log,
      probeTopic,
      ...opts.fleet,
      startDisconnected: true,
    });
    let http: HttpsApi | undefined;
    try {
      if (opts.http) {
        const h = opts.http;
        // The port is known once bound (port 0 in tests): Host checks read it then.
        let port = h.port;
        const handler = createHandler({
          fleet,
          mqttConnected: () => fleet.linkState().connected && client.connected,
          version: opts.version,
          auth: { trustDomain: h.trustDomain, bundles: h.bundles, roles: h.roles },
          hosts: {
            get port() {
              return port;
            },
            names: () => allowedHostNames(h.hostname, h.dnsNames(), h.interfaceAddresses ?? []),
          },
          logger: log,
        });
        http = await serveHttps(handler, {
          hostname: h.hostname,
          port: h.port,
          tls: h.tls,
          urlHost: h.dnsNames()[0],
          maxConnections: h.maxConnections,
        });
        port = http.addr.port;
      }
    } catch (err) {
      await registry.close();
      client.end(true);
      throw err;
    }
    let s: FleetServer;
    try {
      s = new FleetServer(registry, fleet, client, http, log, opts.closeDrainMs ?? 2000);
    } catch (err) {
      await http?.close();
      await registry.close();
      client.end(true);
      throw err;
    }
    const topic = shared ? SHARED_SERVER_SUBSCRIPTION : SERVER_SUBSCRIPTION;

    client.on("connect", (connack) => {
      s.state.connects++;
      log.info(
        `connected to ${opts.brokerUrl} as ${clientOpts.clientId} (session present: ${connack.sessionPresent})`,
      );
      client.subscribeAsync([topic, probeTopic], { qos: 1 }).then((grants) => {
        const bad = grants.find((g) => g.qos !== 1 && g.qos !== 0);
        if (bad) {
          s.state.lastError = `subscription to ${bad.topic} refused (code ${bad.qos})`;
          log.warn(s.state.lastError);
          return;
        }
        s.state.connected = true;
        fleet.linkUp();
        void fleet.dispatchAllOnline();
        const waiters = s.connectWaiters;
        s.connectWaiters = [];
        for (const w of waiters) w();
      }).catch((err) => {
        s.state.lastError = `subscribe failed: ${(err as Error).message}`;
        log.warn(s.state.lastError);
      });
    });
    client.handleMessage = (packet, callback) => s.receive(packet, callback);
    client.on("close", () => {
      // Received on the lost connection and not committed yet: dropped, not applied. They were
      // not acknowledged, so the broker delivers them again on the next connection.
      s.batch = [];
      const was = s.state.connected;
      s.state.connected = false;
      if (s.closed) return;
      if (was) log.warn("disconnected from the broker; reconnecting");
      fleet.linkDown();
    });
    client.on("error", (err: Error & { code?: number }) => {
      s.state.lastError = err.message;
      if (typeof err.code === "number" && AUTH_CODES.has(err.code)) {
        log.warn(`broker refused the login: ${err.message}`);
        opts.onFatal?.(err);
      } else {
        log.warn(`mqtt: ${err.message}`);
      }
    });
    const tls = opts.tls;
    if (tls?.onUpdate) {
      // New connections use the newest SVID; the live TLS session is not affected by rotation.
      s.unsubscribeTls = tls.onUpdate(() =>
        Object.assign(client.options, tlsOptions(tls.current()))
      );
    }
    // QoS 1, like the robots' messages, so it queues behind them in the broker (see fleet.ts).
    s.probeTimer = setInterval(() => {
      if (s.state.connected && client.connected && !s.cycling) {
        client.publish(probeTopic, String(Date.now()), { qos: 1 }, () => {});
      }
    }, opts.probeIntervalMs ?? 500);
    s.sweepTimer = setInterval(() => {
      if (s.sweeping || s.closed) return; // the last one is still running
      s.sweeping = (async () => {
        await s.flush(); // what arrived is applied before silence is judged
        await fleet.sweep();
      })().catch((err) => {
        log.warn(`sweep failed: ${(err as Error).message}`);
      }).finally(() => (s.sweeping = undefined));
    }, opts.sweepIntervalMs ?? 1000);
    client.connect();
    return s;
  }

  connected(): boolean {
    return this.state.connected && this.client.connected;
  }

  /** Resolves once connected and subscribed (rejects after `timeoutMs`). */
  waitConnected(timeoutMs: number): Promise<void> {
    if (this.connected()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.connectWaiters = this.connectWaiters.filter((w) => w !== done);
        reject(
          new Error(
            `not connected to the MQTT broker after ${timeoutMs} ms${
              this.state.lastError ? `: ${this.state.lastError}` : ""
            }`,
          ),
        );
      }, timeoutMs);
      const done = () => {
        clearTimeout(t);
        resolve();
      };
      this.connectWaiters.push(done);
    });
  }

  /**
   * Disconnects (the persistent session stays on the broker) and closes everything, in bounded
   * time: dispatches waiting for a PUBACK get `closeDrainMs`, the DISCONNECT as long again, then
   * the socket is destroyed. A task whose PUBACK never came stays pending/dispatched in the
   * registry and is sent again by the next start (robots dedupe by task id).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    // What was received is committed and acknowledged first (bounded: a database that does not
    // answer must not hold the shutdown; what is not acknowledged is delivered again).
    if (!await within(this.flush(), this.closeDrainMs)) {
      this.log.warn(`close: registry commit still pending after ${this.closeDrainMs} ms`);
    }
    this.closed = true;
    clearInterval(this.sweepTimer);
    clearInterval(this.probeTimer);
    if (this.sweeping) await within(this.sweeping, this.closeDrainMs);
    this.unsubscribeTls?.();
    await this.http?.close();
    const drained = await within(this.fleet.settled(), this.closeDrainMs);
    if (!drained) {
      this.log.warn(`close: dispatches still unacknowledged after ${this.closeDrainMs} ms`);
    }
    await new Promise<void>((resolve) => {
      const client = this.client;
      // The broker may not answer (stopped, or the network is gone): destroy the socket.
      const t = setTimeout(() => {
        client.stream?.destroy();
        resolve();
      }, this.closeDrainMs);
      // Forced (no DISCONNECT wait) when not connected or when publishes are stuck: a clean
      // end() would wait for their PUBACKs forever.
      client.end(!client.connected || !drained, {}, () => {
        clearTimeout(t);
        resolve();
      });
    });
    if (!await within(this.registry.close(), this.closeDrainMs)) {
      this.log.warn(`close: the registry did not close within ${this.closeDrainMs} ms`);
    }
  }
}

/** True when `p` settled within `ms`. */
async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let t: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<false>((resolve) => (t = setTimeout(() => resolve(false), ms)));
  try {
    return await Promise.race([p.then(() => true, () => true), timeout]);
  } finally {
    clearTimeout(t);
  }
}

function tlsOptions(m: MqttTlsMaterial): Partial<IClientOptions> {
  const o: Record<string, unknown> = { key: m.key, cert: m.cert, ca: m.ca };
  if (m.checkServerIdentity) o.checkServerIdentity = m.checkServerIdentity;
  return o as Partial<IClientOptions>;
}

/** Reads `{"username": ..., "password": ...}` from a 0600 file. */
export async function loadMqttCredentials(
  path: string,
): Promise<{ username: string; password: string }> {
  let text: string;
  try {
    text = await readSecretFile(path, "MQTT credentials file");
  } catch (err) {
    if ((err as Error).message === `${path}: MQTT credentials file not found`) {
      throw new Error(`${path}: MQTT credentials file not found (run 'k8s4r devenv start' first)`);
    }
    throw err;
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new Error(`${path}: invalid JSON: ${(err as Error).message}`);
  }
  const o = v as Record<string, unknown>;
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new Error(`${path}: expected a JSON object {"username": ..., "password": ...}`);
  }
  for (const k of ["username", "password"]) {
    if (typeof o[k] !== "string" || o[k] === "") {
      throw new Error(`${path}: ${k}: expected a non-empty string`);
    }
  }
  return { username: o.username as string, password: o.password as string };
}
