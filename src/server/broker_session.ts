/**
 * One persistent MQTT session of the fleet server (mqtt.js), with commit-then-acknowledge
 * ingest. The server runs one for itself and, on PostgreSQL replicas, one more for each dead
 * replica whose session it adopted (replicas.ts).
 *
 * - Fixed client id, `clean: false`, MQTT 5 session expiry of 7 days, so QoS 1 messages robots
 *   publish while the session has no connection are queued by the broker.
 * - Subscribes QoS 1 to its filters and to its own probe topic on EVERY connect.
 * - A message is acknowledged (PUBACK) only after its registry write is committed. Messages are
 *   applied in batches: whatever arrived in one turn of the event loop, or while the previous
 *   batch was being committed, shares one commit, then their PUBACKs go out in order. One batch
 *   is committed at a time. A message whose write fails is never acknowledged: the connection
 *   is cycled, and the broker delivers it again from the persistent session.
 * - Probes: every `probeIntervalMs` it publishes its clock to its probe topic (QoS 1, so it
 *   queues behind the robots' messages); `confirmedAt` is the send time of the newest echo whose
 *   batch committed: everything the broker queued for this session before it has been applied.
 */
import type { PeerCertificate } from "node:tls";
import mqtt from "mqtt";
import type { IClientOptions, IConnackPacket, IPublishPacket, MqttClient } from "mqtt";
import type { BatchResult, Incoming, Logger } from "./fleet.ts";

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

export interface SessionState {
  connected: boolean;
  connects: number;
  lastError?: string;
}

/** CONNACK codes that mean "your credentials are wrong", in MQTT 3.1.1 and 5. */
const AUTH_CODES = new Set([4, 5, 134, 135]);

/** MQTT 5 DISCONNECT reason "Session taken over": another connection with our client id. */
const SESSION_TAKEN_OVER = 0x8e;

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

export function tlsOptions(m: MqttTlsMaterial): Partial<IClientOptions> {
  const o: Record<string, unknown> = { key: m.key, cert: m.cert, ca: m.ca };
  if (m.checkServerIdentity) o.checkServerIdentity = m.checkServerIdentity;
  return o as Partial<IClientOptions>;
}

export interface BrokerSessionOptions {
  brokerUrl: string;
  clientId: string;
  username?: string;
  password?: string;
  tls?: MqttTlsProvider;
  /** Filters subscribed at QoS 1 on every connect (besides the probe topic). */
  subscriptions: string[];
  probeTopic: string;
  probeIntervalMs: number;
  reconnectPeriodMs: number;
  /** The clock probes carry (the database's, on replicas). */
  now: () => number;
  /** Applies a batch in arrival order (FleetService.handleBatch). Never rejects. */
  apply: (items: Incoming[]) => Promise<BatchResult>;
  log: Logger;
  /** The connection's last will (a replica's `serverGoneTopic`), QoS 1, not retained. */
  will?: { topic: string; payload: string };
  /**
   * Messages between servers: `filters` are subscribed too, and a message whose topic
   * `match`es is given to `handle` on arrival, then acknowledged in order like the others.
   */
  control?: {
    filters: string[];
    match: (topic: string) => boolean;
    handle: (topic: string, payload: Uint8Array) => void;
  };
  /** Connected and subscribed. */
  onUp?: (connack: IConnackPacket) => void;
  onDown?: () => void;
  /** The broker refused our login: retrying cannot help. */
  onFatal?: (err: Error) => void;
  /**
   * Another connection took this client id's session (MQTT 5 reason 0x8E): given, the session
   * does not reconnect until `resume()`; without it, mqtt.js reconnects as usual.
   */
  onTakenOver?: () => void;
}

export class BrokerSession {
  readonly state: SessionState = { connected: false, connects: 0 };
  readonly client: MqttClient;
  /** Send time of the newest probe echo whose batch is committed; undefined before the first. */
  confirmedAt?: number;
  private probeTimer?: ReturnType<typeof setInterval>;
  private unsubscribeTls?: () => void;
  private closed = false;
  private connectWaiters: (() => void)[] = [];
  /** Received, not yet committed. */
  private batch: Received[] = [];
  private flushScheduled = false;
  /** The commit-then-ack loop, while it runs (one batch at a time). */
  private flushing?: Promise<void>;
  /** A write failed: this connection is being dropped; nothing more is applied or acked on it. */
  private cyclingStream?: unknown;
  private readonly sendPuback: (messageId: number) => void;
  /** The broker handed our session to another connection: we do not reconnect. */
  takenOver = false;

  constructor(private readonly o: BrokerSessionOptions) {
    const clientOpts: IClientOptions = {
      clientId: o.clientId,
      clean: false,
      protocolVersion: 5,
      properties: { sessionExpiryInterval: SESSION_EXPIRY_SECONDS },
      reconnectPeriod: o.reconnectPeriodMs,
      connectTimeout: 10_000,
      keepalive: 30,
      resubscribe: false, // we subscribe ourselves on every connect
    };
    if (o.username !== undefined) clientOpts.username = o.username;
    if (o.password !== undefined) clientOpts.password = o.password;
    if (o.will) {
      clientOpts.will = {
        topic: o.will.topic,
        payload: Buffer.from(o.will.payload),
        qos: 1,
        retain: false,
      };
    }
    const url = new URL(o.brokerUrl);
    if (url.protocol === "mqtts:") {
      if (!o.tls) throw new Error(`${o.brokerUrl}: mqtts:// needs an X.509 SVID source`);
      Object.assign(clientOpts, tlsOptions(o.tls.current()));
      clientOpts.rejectUnauthorized = true;
    } else if (url.protocol !== "mqtt:") {
      throw new Error(
        `--broker-url: expected mqtt://HOST:PORT or mqtts://HOST:PORT, got ${o.brokerUrl}`,
      );
    }
    // manualConnect: handlers are attached before the first CONNECT goes out.
    this.client = mqtt.connect(o.brokerUrl, { ...clientOpts, manualConnect: true });
    this.sendPuback = pubackSender(this.client);
    this.wire();
  }

  private get log(): Logger {
    return this.o.log;
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

  private wire(): void {
    const { client, o } = this;
    const topics = [...o.subscriptions, ...(o.control?.filters ?? []), o.probeTopic];
    client.on("connect", (connack) => {
      this.state.connects++;
      this.log.info(
        `connected to ${o.brokerUrl} as ${o.clientId} (session present: ${connack.sessionPresent})`,
      );
      client.subscribeAsync(topics, { qos: 1 }).then((grants) => {
        const bad = grants.find((g) => g.qos !== 1 && g.qos !== 0);
        if (bad) {
          this.state.lastError = `subscription to ${bad.topic} refused (code ${bad.qos})`;
          this.log.warn(this.state.lastError);
          return;
        }
        this.state.connected = true;
        o.onUp?.(connack);
        const waiters = this.connectWaiters;
        this.connectWaiters = [];
        for (const w of waiters) w();
      }).catch((err) => {
        this.state.lastError = `subscribe failed: ${(err as Error).message}`;
        this.log.warn(this.state.lastError);
      });
    });
    client.handleMessage = (packet, callback) => this.receive(packet, callback);
    client.on("disconnect", (packet) => {
      if (packet.reasonCode === SESSION_TAKEN_OVER && !this.closed && o.onTakenOver) {
        this.takenOver = true;
        this.log.warn(`the broker handed the session of ${o.clientId} to another connection`);
        // No reconnect: that would take it back. The owner decides (onTakenOver, resume()).
        this.suppressReconnect();
        o.onTakenOver?.();
      }
    });
    client.on("close", () => {
      // Received on the lost connection and not committed yet: dropped, not applied. They were
      // not acknowledged, so the broker delivers them again on the next connection.
      this.batch = [];
      const was = this.state.connected;
      this.state.connected = false;
      if (this.closed) return;
      if (was) this.log.warn(`disconnected from the broker (${o.clientId}); reconnecting`);
      o.onDown?.();
    });
    client.on("error", (err: Error & { code?: number }) => {
      this.state.lastError = err.message;
      if (typeof err.code === "number" && AUTH_CODES.has(err.code)) {
        this.log.warn(`broker refused the login: ${err.message}`);
        o.onFatal?.(err);
      } else {
        this.log.warn(`mqtt: ${err.message}`);
      }
    });
    const tls = o.tls;
    if (tls?.onUpdate) {
      // New connections use the newest SVID; the live TLS session is not affected by rotation.
      this.unsubscribeTls = tls.onUpdate(() =>
        Object.assign(client.options, tlsOptions(tls.current()))
      );
    }
    // QoS 1, like the robots' messages, so it queues behind them in the broker.
    this.probeTimer = setInterval(() => {
      if (this.state.connected && client.connected && !this.cycling) {
        client.publish(o.probeTopic, String(o.now()), { qos: 1 }, () => {});
      }
    }, o.probeIntervalMs);
  }

  start(): void {
    this.client.connect();
  }

  connected(): boolean {
    return this.state.connected && this.client.connected;
  }

  /** mqtt.js calls this for every PUBLISH, one at a time, before it would send the PUBACK. */
  private receive(packet: IPublishPacket, callback: (err?: Error) => void): void {
    if (this.cycling || this.closed) {
      // Not applied and not acknowledged: the broker delivers it again on the next connection.
      callback(ACK_LATER);
      return;
    }
    // The broker sends no topic aliases: we advertise no topicAliasMaximum.
    const control = this.o.control?.match(packet.topic) === true;
    if (control) {
      try {
        this.o.control!.handle(packet.topic, packet.payload as Uint8Array);
      } catch (err) {
        this.log.warn(`on ${packet.topic}: ${(err as Error).message}`);
      }
    }
    this.batch.push({
      topic: packet.topic,
      payload: packet.payload as Uint8Array,
      probe: packet.topic === this.o.probeTopic || undefined,
      control: control || undefined,
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
        const r = await this.o.apply(items);
        for (let i = 0; i < r.acked; i++) {
          const m = items[i];
          if (m.probe) {
            const sent = Number(new TextDecoder().decode(m.payload));
            if (
              Number.isFinite(sent) && (this.confirmedAt === undefined || sent > this.confirmedAt)
            ) {
              this.confirmedAt = sent;
            }
          }
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
    // A normal DISCONNECT first: the session (and what it holds unacknowledged) stays, and the
    // broker drops this connection's will (we are not gone, only reconnecting).
    (this.client as unknown as { _sendPacket(p: object): void })._sendPacket({
      cmd: "disconnect",
      reasonCode: 0,
    });
    // end() first so the PUBACKs already written reach the broker; destroy() ends the wait.
    const t = setTimeout(() => stream.destroy(), 1000);
    stream.end(() => {
      clearTimeout(t);
      stream.destroy();
    });
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

  /** mqtt.js does not reconnect until `resume()` (its own flag, as after a refused CONNACK). */
  private suppressReconnect(): void {
    const c = this.client as unknown as {
      reconnectSuppressed: boolean;
      _clearReconnect(): void;
    };
    c.reconnectSuppressed = true;
    c._clearReconnect();
  }

  /** True while `pause()` or a takeover keeps it away from the broker. */
  paused = false;

  /**
   * Drops the connection and keeps away from the broker (the session and what it queues stay
   * there) until `resume()`: a replica that has lost its lease must not hold its session.
   * mqtt.js keeps its stores: publishes waiting for a PUBACK are sent again on resume.
   */
  pause(): void {
    if (this.closed || this.paused) return;
    this.paused = true;
    this.batch = [];
    this.suppressReconnect();
    this.client.stream?.destroy();
  }

  resume(): void {
    if (this.closed) return;
    const wasPaused = this.paused || this.takenOver;
    this.paused = false;
    this.takenOver = false;
    if (!wasPaused || this.client.connected) return;
    this.client.reconnect({
      incomingStore: this.client.incomingStore,
      outgoingStore: this.client.outgoingStore,
    });
  }

  /** Stops the probe; the caller flushes first (see close). */
  stopTimers(): void {
    clearInterval(this.probeTimer);
  }

  /** Commits and acknowledges what was received, within `drainMs`; true when it did. */
  async drainReceived(drainMs: number): Promise<boolean> {
    return await within(this.flush(), drainMs);
  }

  /**
   * Disconnects (the persistent session stays on the broker) in bounded time: `drainMs` for
   * the DISCONNECT, then the socket is destroyed. `force`: no DISCONNECT wait (publishes are
   * stuck). Call `drainReceived` first to acknowledge what was committed.
   */
  async close(drainMs: number, force = false): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stopTimers();
    this.unsubscribeTls?.();
    await new Promise<void>((resolve) => {
      const client = this.client;
      // The broker may not answer (stopped, or the network is gone): destroy the socket.
      const t = setTimeout(() => {
        client.stream?.destroy();
        resolve();
      }, drainMs);
      // Forced (no DISCONNECT wait) when not connected or when publishes are stuck: a clean
      // end() would wait for their PUBACKs forever.
      client.end(!client.connected || force, {}, () => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  /**
   * Tests only: what `kill -9` leaves behind, seen from the broker: the socket is closed
   * without DISCONNECT, nothing is acknowledged or flushed, no timer keeps running.
   */
  crash(): void {
    this.closed = true;
    this.stopTimers();
    this.unsubscribeTls?.();
    this.batch = [];
    this.client.options.reconnectPeriod = 0;
    this.client.stream?.destroy();
    this.client.end(true);
  }
}

/** True when `p` settled within `ms`. */
export async function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let t: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<false>((resolve) => (t = setTimeout(() => resolve(false), ms)));
  try {
    return await Promise.race([p.then(() => true, () => true), timeout]);
  } finally {
    clearTimeout(t);
  }
}
