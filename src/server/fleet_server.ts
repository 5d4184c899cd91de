/**
 * The fleet server process: an MQTT client (mqtt.js) with a persistent session, the registry,
 * the sweeper and the HTTP API, wired around `FleetService`.
 *
 * - Plain `mqtt://127.0.0.1:1883` with a username/password (the loopback listener), or
 *   `mqtts://` with an X.509 SVID (an `MqttTlsProvider`, e.g. built from an `X509Source`).
 * - Persistent session: fixed client id, `clean: false`, MQTT 5 session expiry of 7 days, so
 *   QoS 1 messages robots publish while the server is down are queued by the broker.
 * - Subscribes QoS 1 to `k8s4r/robots/+/up/#` (or `$share/k8s4r/...` with shared
 *   subscriptions) on EVERY connect, not only the first.
 * - A message is processed (registry write) before mqtt.js sends its PUBACK.
 */
import type { PeerCertificate } from "node:tls";
import mqtt from "mqtt";
import type { IClientOptions, MqttClient } from "mqtt";
import { SERVER_SUBSCRIPTION, SHARED_SERVER_SUBSCRIPTION } from "../fleet/topics.ts";
import { type FleetOptions, FleetService, type Logger, silentLogger } from "./fleet.ts";
import { type HttpApi, serveHttpApi } from "./http_api.ts";
import { Registry } from "./registry.ts";

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

export interface FleetServerOptions {
  brokerUrl: string;
  username?: string;
  password?: string;
  tls?: MqttTlsProvider;
  clientId?: string;
  sharedSubscription?: boolean;
  dataDir: string;
  /** false: no HTTP API (tests of the MQTT side). */
  http: { hostname: string; port: number } | false;
  fleet?: FleetOptions;
  /** Default 1000 ms. */
  sweepIntervalMs?: number;
  /** Default 1000 ms. */
  reconnectPeriodMs?: number;
  logger?: Logger;
  version?: string;
  /** Called when the broker refuses our login: retrying cannot help. */
  onFatal?: (err: Error) => void;
}

export interface FleetServerState {
  connected: boolean;
  connects: number;
  lastError?: string;
}

/** CONNACK codes that mean "your credentials are wrong", in MQTT 3.1.1 and 5. */
const AUTH_CODES = new Set([4, 5, 134, 135]);

export class FleetServer {
  readonly state: FleetServerState = { connected: false, connects: 0 };
  private sweepTimer?: ReturnType<typeof setInterval>;
  private unsubscribeTls?: () => void;
  private closed = false;
  private connectWaiters: (() => void)[] = [];

  private constructor(
    readonly registry: Registry,
    readonly fleet: FleetService,
    readonly client: MqttClient,
    readonly http: HttpApi | undefined,
    private readonly log: Logger,
  ) {}

  static async start(opts: FleetServerOptions): Promise<FleetServer> {
    const log = opts.logger ?? silentLogger;
    const registry = await Registry.open(opts.dataDir);
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
    const fleet = new FleetService(registry, publisher, { logger: log, ...opts.fleet });
    let http: HttpApi | undefined;
    try {
      if (opts.http) {
        http = serveHttpApi({
          fleet,
          mqttConnected: () => client.connected,
          version: opts.version,
        }, opts.http);
      }
    } catch (err) {
      registry.close();
      client.end(true);
      throw err;
    }
    const s = new FleetServer(registry, fleet, client, http, log);
    const topic = shared ? SHARED_SERVER_SUBSCRIPTION : SERVER_SUBSCRIPTION;

    client.on("connect", (connack) => {
      s.state.connects++;
      log.info(
        `connected to ${opts.brokerUrl} as ${clientOpts.clientId} (session present: ${connack.sessionPresent})`,
      );
      client.subscribeAsync(topic, { qos: 1 }).then((grants) => {
        const bad = grants.find((g) => g.qos !== 1 && g.qos !== 0);
        if (bad) {
          s.state.lastError = `subscription to ${topic} refused (code ${bad.qos})`;
          log.warn(s.state.lastError);
          return;
        }
        s.state.connected = true;
        fleet.dispatchAllOnline();
        const waiters = s.connectWaiters;
        s.connectWaiters = [];
        for (const w of waiters) w();
      }).catch((err) => {
        s.state.lastError = `subscribe failed: ${(err as Error).message}`;
        log.warn(s.state.lastError);
      });
    });
    client.on("message", (t, payload) => {
      fleet.handleMessage(t, payload);
    });
    client.on("close", () => {
      if (s.state.connected) log.warn("disconnected from the broker; reconnecting");
      s.state.connected = false;
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
    s.sweepTimer = setInterval(() => {
      try {
        fleet.sweep();
      } catch (err) {
        log.warn(`sweep failed: ${(err as Error).message}`);
      }
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

  /** Disconnects cleanly (the persistent session stays on the broker) and closes everything. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.sweepTimer);
    this.unsubscribeTls?.();
    await this.http?.close();
    await this.fleet.settled().catch(() => {});
    await new Promise<void>((resolve) => {
      // force when not connected: there is nothing to flush, and end() would wait forever.
      this.client.end(!this.client.connected, {}, () => resolve());
    });
    this.registry.close();
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
    text = await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw new Error(`${path}: MQTT credentials file not found (run 'k8s4r devenv start' first)`);
    }
    throw new Error(`${path}: cannot read MQTT credentials: ${(err as Error).message}`);
  }
  const st = await Deno.stat(path);
  if (st.mode !== null && (st.mode & 0o077) !== 0) {
    throw new Error(
      `${path}: MQTT credentials file must not be readable by others (mode ${
        (st.mode & 0o777).toString(8)
      }, expected 600)`,
    );
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
