/**
 * One robot's MQTT session over mTLS, with certificate rotation and no loss of QoS 1 messages.
 *
 * Protocol: MQTT 5, `clean: false` with a session expiry. Why 5 and not 3.1.1: Mosquitto drops
 * a publish the ACL denies silently under 3.1.1, while MQTT 5 answers with PUBACK / SUBACK
 * reason code 0x87 (Not authorized), which we count and log; and a 3.1.1 persistent session
 * lives forever on the broker, while MQTT 5's `sessionExpiryInterval` bounds it.
 *
 * How mqtt.js 5.16 behaves (read in node_modules/.deno/mqtt@5.16.0, build/lib/client.js and
 * connect/):
 * - `MqttClient` calls its stream builder on EVERY connection attempt (`connect()` ->
 *   `streamBuilder(this)`). Ours (`openTls`) reads `client.options` (key, cert, ca,
 *   checkServerIdentity) each time, so updating `client.options.key/cert/ca` takes effect on the
 *   next (re)connect; the current TLS connection keeps its old certificate.
 * - The client is made with `new MqttClient(openTls, options)`, not `mqtt.connect(url)`:
 *   `connect()` loads the transports of every scheme on its first call (WebSocket through `ws`,
 *   SOCKS proxies through `socks` and `ip-address`, plain TCP), ~0.5 MB of JavaScript the agent
 *   never runs; the agent speaks MQTT over TLS only. `openTls` is what mqtt.js's own TLS
 *   builder (build/lib/connect/tls.js) does without a SOCKS proxy: `tls.connect`, SNI for a
 *   host name, and a TLS error reported on the client and the socket ended.
 * - A QoS 1 publish is put in `outgoingStore` before it is written, and stays there until its
 *   PUBACK. While disconnected, publishes also go to `outgoingStore`. On CONNACK, `_onConnect`
 *   replays the whole store before emitting `connect`. So an automatic reconnect (after the
 *   stream closes, `reconnectPeriod` later) re-sends every unacknowledged message.
 * - `client.reconnect()` and `client.end()` are NOT usable for rotation: `end()` closes the
 *   stores (Store.close drops its map) and `reconnect()` without arguments replaces both stores
 *   with empty ones, losing in-flight messages. A new client per certificate would lose the
 *   old client's in-flight messages the same way.
 * - Publishes queued while the client replays its store (`_storeProcessingQueue`) are failed
 *   with "Connection closed" if the connection drops meanwhile; they are NOT in the store.
 *
 * Hence: one client for the agent's life. Rotation = put the new key/cert/ca into
 * `client.options`, then end the current connection with a normal MQTT DISCONNECT (so the
 * broker discards the will) WITHOUT calling `client.end()`: mqtt.js sees the stream close and
 * reconnects by itself with its stores intact, now presenting the new certificate. On top,
 * this module keeps its own queue: messages published while not ready, and messages mqtt.js
 * failed without a reason code, are (re)published after the next `connect`. A PUBACK with an
 * error reason code (e.g. not authorized) is final: counted as denied, not retried.
 */
import { waitFor } from "../process/mod.ts";
import { MqttClient } from "mqtt";
import type { IClientOptions, IPublishPacket } from "mqtt";
import { isIP } from "node:net";
import {
  connect as tlsConnect,
  type ConnectionOptions,
  type PeerCertificate,
  type TLSSocket,
} from "node:tls";
import { parseBrokerUrl } from "../fleet/addresses.ts";

/** What the TLS layer gives us: a snapshot of key, chain, bundle and the peer check. */
export interface TlsSnapshot {
  key: string;
  cert: string;
  ca: string;
  checkServerIdentity: (host: string, cert: PeerCertificate) => Error | undefined;
  /** When the leaf in `cert` expires. */
  notAfter: Date;
  notBefore: Date;
}

export type Logger = (event: string, fields?: Record<string, unknown>) => void;

export interface MqttSessionOptions {
  /** `mqtts://host:port`. */
  url: string;
  clientId: string;
  /** Current TLS material; called at start and after every `refreshTls()`. */
  tls: () => TlsSnapshot;
  keepaliveSeconds: number;
  sessionExpirySeconds: number;
  /**
   * The last will of connection attempt `connection` (1, 2, 3... for this session's life). A
   * will is fixed at CONNECT, so it is rebuilt before every attempt: initial, reconnects after a
   * drop, and rotation cycles.
   */
  will: (connection: number) => { topic: string; payload: Uint8Array; retain: boolean };
  /** Subscribed (QoS 1) after every connect, whether or not the session was present. */
  subscriptions: string[];
  /** Reconnect backoff: first delay, doubling up to max, with +-20 % jitter. */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  /** Reconnect proactively when the connection's certificate gets this close to expiry. */
  rotationMarginMs: number;
  /** How often the expiry margin is checked (default: a tenth of the margin, 1..30 s). */
  expiryCheckMs?: number;
  connectTimeoutMs?: number;
  log: Logger;
  /**
   * After every connect, once subscriptions are requested and BEFORE the messages held while
   * offline are handed over: what it publishes goes first on the new connection. `connection`
   * is the number of the attempt that connected (the one whose will the broker now holds).
   */
  onConnect?: (info: { sessionPresent: boolean; connects: number; connection: number }) => void;
  onMessage?: (topic: string, payload: Uint8Array) => void;
}

export interface SessionStats {
  connects: number;
  reconnects: number;
  /** TLS material updates applied (SVID or bundle). */
  rotations: number;
  /** Connections ended on purpose to present a new certificate. */
  rotationReconnects: number;
  /** QoS 1 publishes requested. */
  sent: number;
  acked: number;
  /** PUBACK with an error reason code (e.g. 0x87 not authorized). */
  denied: number;
  /** Publishes requested while not connected (held until a connection). */
  buffered: number;
  /** Publishes requested and not yet acknowledged or denied. */
  pending: number;
  /** Publishes re-queued by us after mqtt.js failed them without a broker answer. */
  retried: number;
  received: number;
  subscribeDenied: number;
  lastError?: string;
  connected: boolean;
}

/** "cancelled": its signal aborted while it was still held here (never sent). */
export type PublishOutcome = "acked" | "denied" | "abandoned" | "cancelled";

interface Pending {
  topic: string;
  payload: Uint8Array;
  retain: boolean;
  signal?: AbortSignal;
  resolve: (o: PublishOutcome) => void;
}

/**
 * A TLS connection to the broker with the client's current key, chain, bundle and peer check
 * (mqtt.js's TLS stream builder without its SOCKS branch). A TLS error (refused certificate,
 * wrong broker identity) is emitted on the client, and the socket ended, so mqtt.js reconnects.
 */
function openTls(client: MqttClient, host: string, port: number): TLSSocket {
  const o = client.options as IClientOptions & Pick<ConnectionOptions, "checkServerIdentity">;
  const socket = tlsConnect({
    host,
    port,
    servername: isIP(host) === 0 ? host : undefined,
    key: o.key as string,
    cert: o.cert as string,
    ca: o.ca as string,
    rejectUnauthorized: true,
    checkServerIdentity: o.checkServerIdentity,
  });
  const onError = (err: Error) => {
    client.emit("error", err);
    socket.end();
  };
  socket.on("error", onError);
  socket.on("secureConnect", () => {
    if (!socket.authorized) socket.emit("error", new Error("TLS not authorized"));
    else socket.removeListener("error", onError);
  });
  return socket;
}

/** MQTT DISCONNECT, reason "normal disconnection" (0): the broker then discards the will. */
const DISCONNECT_NORMAL = Uint8Array.of(0xe0, 0x00);

export class MqttSession {
  private client?: MqttClient;
  private readonly queue: Pending[] = [];
  private readonly outstanding = new Set<Pending>();
  private ready = false;
  private cycling = false;
  private closing = false;
  private backoffMs: number;
  private expiryTimer?: ReturnType<typeof setInterval>;
  /** The certificate validity in `client.options` and on the live connection. */
  private optionsCert?: TlsSnapshot;
  private attemptCert?: TlsSnapshot;
  private connectionCert?: TlsSnapshot;
  private expiryWarned = false;
  readonly stats: SessionStats = {
    connects: 0,
    reconnects: 0,
    rotations: 0,
    rotationReconnects: 0,
    sent: 0,
    acked: 0,
    denied: 0,
    buffered: 0,
    pending: 0,
    retried: 0,
    received: 0,
    subscribeDenied: 0,
    connected: false,
  };
  private readonly minMs: number;
  private readonly maxMs: number;
  private connectWaiters: (() => void)[] = [];
  /** Connection attempts so far; the current (or last) attempt's number. */
  private attempt = 0;

  constructor(private readonly o: MqttSessionOptions) {
    this.minMs = o.reconnectMinMs ?? 1000;
    this.maxMs = o.reconnectMaxMs ?? 30_000;
    this.backoffMs = this.minMs;
  }

  get connected(): boolean {
    return this.ready;
  }

  /** The number of the current (or last) connection attempt: 1, 2, 3... */
  get connection(): number {
    return this.attempt;
  }

  /** The certificate the live connection presented (undefined when offline). */
  get connectionNotAfter(): Date | undefined {
    return this.ready ? this.connectionCert?.notAfter : undefined;
  }

  /** Starts connecting (and keeps reconnecting). Returns at once. */
  start(): void {
    if (this.client) throw new Error("MqttSession already started");
    const tls = this.o.tls();
    this.optionsCert = tls;
    this.attemptCert = tls;
    this.attempt = 1;
    // mqtt.js hands the whole options object to tls.connect, so node:tls options pass through.
    const opts: IClientOptions & Pick<ConnectionOptions, "checkServerIdentity"> = {
      clientId: this.o.clientId,
      protocolVersion: 5,
      clean: false,
      keepalive: this.o.keepaliveSeconds,
      properties: { sessionExpiryInterval: this.o.sessionExpirySeconds },
      reconnectPeriod: this.jittered(this.minMs),
      connectTimeout: this.o.connectTimeoutMs ?? 15_000,
      // We re-subscribe ourselves after every connect (even when the session is present).
      resubscribe: false,
      queueQoSZero: true,
      // mqtt-packet otherwise builds, on the first packet, a cache of all 65,536 two-byte
      // numbers (one Buffer each, ~5 MB of the agent's heap) to save one 2-byte allocation per
      // packet id, topic length and keepalive: pointless at a few packets per second. The bytes
      // on the wire are the same (mqtt_session_test.ts). The switch is process-wide in
      // mqtt-packet (`writeToStream.cacheNumbers`), set by mqtt.js when a client has
      // `writeCache: false`; nothing else in mqtt.js reads it.
      writeCache: false,
      will: this.willFor(1),
      key: tls.key,
      cert: tls.cert,
      ca: tls.ca,
      rejectUnauthorized: true,
      // The broker is authenticated by its SPIFFE ID (chain to the SPIRE bundle), not its name.
      checkServerIdentity: tls.checkServerIdentity,
    };
    const { host, port } = parseBrokerUrl(this.o.url);
    const client: MqttClient = new MqttClient((c) => openTls(c, host, port), opts);
    this.client = client;
    client.on("connect", (connack) => this.onConnect(connack.sessionPresent === true));
    client.on("reconnect", () => {
      // mqtt.js emits this synchronously right before connect() writes CONNECT from
      // client.options (client.js `_reconnect`): the place to give this attempt its own will.
      this.attempt++;
      client.options.will = this.willFor(this.attempt);
      this.stats.reconnects++;
      this.attemptCert = this.optionsCert;
      // mqtt.js schedules the next attempt with options.reconnectPeriod when this one fails.
      this.backoffMs = Math.min(this.maxMs, this.backoffMs * 2);
      client.options.reconnectPeriod = this.jittered(this.backoffMs);
      this.o.log("mqtt.reconnecting", { attempt: this.stats.reconnects });
    });
    client.on("close", () => {
      const was = this.ready;
      this.ready = false;
      this.stats.connected = false;
      if (was && !this.closing) {
        this.o.log("mqtt.disconnected", {
          inFlight: this.outstanding.size,
          nextAttemptMs: client.options.reconnectPeriod,
          planned: this.cycling,
        });
      }
    });
    client.on("error", (err) => {
      const msg = (err as Error).message;
      if (msg !== this.stats.lastError) this.o.log("mqtt.error", { error: msg });
      this.stats.lastError = msg;
    });
    client.on("message", (topic, payload) => {
      this.stats.received++;
      try {
        this.o.onMessage?.(topic, new Uint8Array(payload));
      } catch (err) {
        this.o.log("mqtt.handler_error", { topic, error: (err as Error).message });
      }
    });
    this.startExpiryCheck();
  }

  private willFor(connection: number): NonNullable<IClientOptions["will"]> {
    const w = this.o.will(connection);
    return { topic: w.topic, payload: Buffer.from(w.payload), qos: 1, retain: w.retain };
  }

  private jittered(ms: number): number {
    return Math.max(10, Math.round(ms * (0.8 + Math.random() * 0.4)));
  }

  private onConnect(sessionPresent: boolean) {
    const client = this.client!;
    this.stats.connects++;
    this.stats.connected = true;
    this.ready = true;
    this.cycling = false;
    this.connectionCert = this.attemptCert;
    this.backoffMs = this.minMs;
    client.options.reconnectPeriod = this.jittered(this.minMs);
    this.o.log("mqtt.connected", {
      sessionPresent,
      connects: this.stats.connects,
      certExpires: this.connectionCert?.notAfter.toISOString(),
    });
    for (const topic of this.o.subscriptions) {
      client.subscribe(topic, { qos: 1 }, (err, granted) => {
        if (err) {
          this.o.log("mqtt.subscribe_failed", { topic, error: err.message });
          return;
        }
        for (const g of granted ?? []) {
          if (g.qos >= 0x80) {
            this.stats.subscribeDenied++;
            this.o.log("mqtt.subscribe_denied", { topic: g.topic, reasonCode: g.qos });
          }
        }
      });
    }
    // First what the connection announces (register, online), then the messages held while we
    // were offline or rotating, in order.
    this.o.onConnect?.({ sessionPresent, connects: this.stats.connects, connection: this.attempt });
    const held = this.queue.splice(0);
    for (const p of held) this.hand(p);
    for (const w of this.connectWaiters.splice(0)) w();
    // The connection came up with an older certificate than the newest one: cycle at once.
    if (this.optionsCert !== this.connectionCert) {
      this.cycle("newer certificate arrived during connect");
    }
  }

  /**
   * Publishes with QoS 1. Resolves when the broker acknowledged it ("acked"), refused it
   * ("denied"), or when the session closed before it could be delivered ("abandoned").
   * Never rejects.
   */
  publish(
    topic: string,
    payload: Uint8Array,
    opts: { retain?: boolean; signal?: AbortSignal } = {},
  ): Promise<PublishOutcome> {
    this.stats.sent++;
    this.stats.pending++;
    return new Promise((resolve) => {
      const p: Pending = {
        topic,
        payload,
        retain: opts.retain ?? false,
        signal: opts.signal,
        resolve: (o) => {
          this.stats.pending--;
          resolve(o);
        },
      };
      if (this.closing && !this.client) return p.resolve("abandoned");
      if (opts.signal?.aborted) return p.resolve("cancelled");
      if (!this.ready || this.cycling) {
        this.stats.buffered++;
        this.queue.push(p);
        // Cancelled while held: taken out of the queue. Once handed to mqtt.js it goes anyway.
        opts.signal?.addEventListener("abort", () => {
          const i = this.queue.indexOf(p);
          if (i >= 0) {
            this.queue.splice(i, 1);
            p.resolve("cancelled");
          }
        }, { once: true });
        return;
      }
      this.hand(p);
    });
  }

  /** Gives a message to mqtt.js; from then on its store owns it until PUBACK. */
  private hand(p: Pending) {
    const client = this.client!;
    if (p.signal?.aborted) return p.resolve("cancelled");
    this.outstanding.add(p);
    client.publish(p.topic, Buffer.from(p.payload), { qos: 1, retain: p.retain }, (err, packet) => {
      const reasonCode = (err as { code?: number } | undefined)?.code ??
        (packet as IPublishPacket & { reasonCode?: number } | undefined)?.reasonCode;
      if (!err) {
        this.outstanding.delete(p);
        this.stats.acked++;
        p.resolve("acked");
        return;
      }
      if (typeof reasonCode === "number" && reasonCode >= 0x80) {
        this.outstanding.delete(p);
        this.stats.denied++;
        this.o.log("mqtt.publish_denied", { topic: p.topic, reasonCode, error: err.message });
        p.resolve("denied");
        return;
      }
      // Failed locally ("Connection closed", "client disconnecting"): not in mqtt.js's store.
      this.outstanding.delete(p);
      if (this.closing) {
        p.resolve("abandoned");
        return;
      }
      this.stats.retried++;
      if (this.ready && !this.cycling) this.hand(p);
      else this.queue.push(p);
    });
  }

  /**
   * New TLS material (SVID or bundle rotated): used for every later connection, and the live
   * connection is replaced now so that it never outlives its certificate.
   */
  refreshTls(reason: string): void {
    const client = this.client;
    if (!client || this.closing) return;
    let tls: TlsSnapshot;
    try {
      tls = this.o.tls();
    } catch (err) {
      this.o.log("mqtt.tls_refresh_failed", { reason, error: (err as Error).message });
      return;
    }
    this.stats.rotations++;
    this.optionsCert = tls;
    this.expiryWarned = false;
    Object.assign(client.options, {
      key: tls.key,
      cert: tls.cert,
      ca: tls.ca,
      checkServerIdentity: tls.checkServerIdentity,
    });
    this.o.log("mqtt.tls_updated", { reason, certExpires: tls.notAfter.toISOString() });
    this.cycle(reason);
  }

  /** Ends the live connection cleanly; mqtt.js reconnects with `client.options` and its stores. */
  private cycle(reason: string) {
    const client = this.client;
    if (!client || !this.ready || this.cycling || this.closing) return;
    this.cycling = true;
    this.stats.rotationReconnects++;
    this.o.log("mqtt.rotating_connection", { reason, inFlight: this.outstanding.size });
    // Reconnect at once after a planned cycle (mqtt.js uses this for the next attempt; 0 would
    // disable reconnecting altogether). The broker hands the session over to the new connection.
    client.options.reconnectPeriod = Math.min(this.minMs, 20);
    try {
      client.stream.end(DISCONNECT_NORMAL);
    } catch (err) {
      this.o.log("mqtt.rotate_error", { error: (err as Error).message });
      client.stream.destroy();
    }
  }

  private startExpiryCheck() {
    const margin = this.o.rotationMarginMs;
    const every = this.o.expiryCheckMs ?? Math.min(30_000, Math.max(1000, margin / 10));
    this.expiryTimer = setInterval(() => this.checkExpiry(), every);
  }

  /** Called periodically; exported behaviour: proactive reconnect near expiry. */
  checkExpiry(now = Date.now()): void {
    const conn = this.connectionCert;
    if (!this.ready || !conn) return;
    const life = conn.notAfter.getTime() - conn.notBefore.getTime();
    const margin = Math.min(this.o.rotationMarginMs, life / 3);
    if (conn.notAfter.getTime() - now > margin) return;
    const newest = this.optionsCert;
    if (newest && newest.notAfter.getTime() > conn.notAfter.getTime()) {
      this.cycle("connection certificate near expiry");
    } else if (!this.expiryWarned) {
      this.expiryWarned = true;
      this.o.log("mqtt.svid_expiring", {
        expires: conn.notAfter.toISOString(),
        note: "no newer SVID from the SPIRE agent yet",
      });
    }
  }

  /** Resolves at the next connect (or at once when connected). */
  whenConnected(signal?: AbortSignal): Promise<void> {
    if (this.ready) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const onAbort = () => reject(signal!.reason);
      signal?.addEventListener("abort", onAbort, { once: true });
      this.connectWaiters.push(() => {
        signal?.removeEventListener("abort", onAbort);
        resolve();
      });
    });
  }

  /**
   * Waits (bounded) for outstanding messages to be acknowledged, then disconnects cleanly.
   * Messages still held are abandoned (counted in `pending` before this resolves).
   */
  async close(drainMs = 5000): Promise<void> {
    const client = this.client;
    if (!client) return;
    if (this.expiryTimer) clearInterval(this.expiryTimer);
    // Bounded drain: whatever is still unacknowledged after drainMs is abandoned below.
    await waitFor(
      () => !this.ready || (this.outstanding.size === 0 && this.queue.length === 0),
      { timeoutMs: drainMs, intervalMs: 20, what: "outstanding messages to be acknowledged" },
    ).catch(() => {});
    this.closing = true;
    const left = this.outstanding.size + this.queue.length;
    if (left > 0) this.o.log("mqtt.abandoning", { messages: left });
    await new Promise<void>((resolve) => {
      // force=false sends DISCONNECT when connected; when offline it just stops reconnecting.
      client.end(!this.ready || left > 0, {}, () => resolve());
    });
    for (const p of [...this.outstanding, ...this.queue.splice(0)]) p.resolve("abandoned");
    this.outstanding.clear();
    this.ready = false;
    this.stats.connected = false;
    this.client = undefined;
  }
}
