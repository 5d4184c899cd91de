/**
 * The fleet server process: its broker session (broker_session.ts: persistent, commit then
 * acknowledge), the registry, the sweeper and the HTTPS API (https.ts, http_api.ts), wired
 * around `FleetService`.
 *
 * - Plain `mqtt://127.0.0.1:1883` with a username/password (the loopback listener), or
 *   `mqtts://` with an X.509 SVID (an `MqttTlsProvider`, e.g. built from an `X509Source`).
 * - Subscribes QoS 1 to `k8s4r/robots/+/up/#` (or `$share/<secret group>/...` with shared
 *   subscriptions) on EVERY connect, not only the first.
 * - While disconnected, robots' states are "unknown" and the sweeper marks nobody offline
 *   (FleetService.linkDown/linkUp).
 * - Replicas (`sharedSubscription`, PostgreSQL only): a lease and a probe clock per replica in
 *   the registry, one sweeper, adoption of dead replicas' sessions (replicas.ts); the retained
 *   statuses, which a shared subscription never gets, are read on every connect through a
 *   short-lived plain subscription (`readRetained`).
 * - close() is bounded: dispatches still waiting for their PUBACK get `closeDrainMs`, then the
 *   connection is dropped (the tasks stay pending/dispatched in the registry and are sent
 *   again by the next start or by another replica once their claim expires).
 */
import mqtt from "mqtt";
import {
  ROBOT_STATUS_FILTER,
  SERVER_GONE_FILTER,
  SERVER_SUBSCRIPTION,
  serverGoneTopic,
  serverProbeTopic,
  sharedServerSubscription,
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
import {
  BrokerSession,
  type BrokerSessionOptions,
  type MqttTlsProvider,
  type SessionState,
  tlsOptions,
  within,
} from "./broker_session.ts";
import { createHandler } from "./http_api.ts";
import { type HttpsApi, serveHttps, type ServerTlsProvider } from "./https.ts";
import type { Registry, ReplicaRow } from "./registry.ts";
import type { PostgresConfig } from "./registry_postgres.ts";
import { ReplicaSet } from "./replicas.ts";
import type { RolesSource } from "./roles.ts";
import { openRegistry } from "./storage.ts";
import { readSecretFile } from "../fs/secret.ts";
import type { CaValidity } from "./metrics.ts";
import { type FleetObservers, observeFleet } from "./observe.ts";
import { DashboardSessions, type SessionsOptions } from "./sessions.ts";

export {
  type MqttTlsMaterial,
  type MqttTlsProvider,
  SESSION_EXPIRY_SECONDS,
} from "./broker_session.ts";

export const SERVER_CLIENT_ID = "k8s4r-server";

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
  /**
   * Replicas: `$share/<secret group>/...` (topics.ts `sharedGroup`) and the shared state of replicas.ts. Needs `postgres` (one
   * SQLite file per server would be one registry per server: refused).
   */
  sharedSubscription?: boolean;
  /** The SQLite registry's directory (unused with `postgres`). */
  dataDir: string;
  /** Keep the registry in PostgreSQL instead of SQLite. */
  postgres?: PostgresConfig;
  /** false: no HTTP API (tests of the MQTT side). */
  http: HttpsOptions | false;
  /** Its `signer` signs every task and cancel (the server's SVID: `TaskSigner`). */
  fleet: FleetOptions;
  /** Default 1000 ms. */
  sweepIntervalMs?: number;
  /** How often the server probes the broker's delivery through its own topic. Default 500 ms. */
  probeIntervalMs?: number;
  /** Default 1000 ms. */
  reconnectPeriodMs?: number;
  /** Replicas: lease length (default 4000 ms), renewed every `replicaTickMs` (default 500). */
  leaseMs?: number;
  replicaTickMs?: number;
  logger?: Logger;
  version?: string;
  /** Called when the broker refuses our login, or another process took our client id. */
  onFatal?: (err: Error) => void;
  /** How long close() waits for dispatches in flight and for the DISCONNECT. Default 2000 ms. */
  closeDrainMs?: number;
  /** The CAs the fleet trusts, for the trust-bundle metrics (the server's X509Source). */
  trustBundle?: () => readonly CaValidity[] | undefined;
  /** Dashboard login and session lifetimes (sessions.ts). */
  dashboard?: SessionsOptions;
}

export type FleetServerState = SessionState;

/** A replica whose lease expired this long ago is adopted (the sweeper connects as it). */
const ADOPT_AFTER_MS = 1000;
/** ... or whose link is down and whose clock has not moved for this long. */
const ADOPT_STALLED_MS = 10_000;

export class FleetServer {
  private sweepTimer?: ReturnType<typeof setInterval>;
  private tickTimer?: ReturnType<typeof setInterval>;
  private closed = false;
  private sweeping?: Promise<void>;
  private ticking?: Promise<void>;
  /** Sessions of dead replicas this process runs (client id -> session). */
  readonly adoptions = new Map<string, BrokerSession>();
  private main!: BrokerSession;
  private retained?: Promise<void>;
  private retainedRetry?: ReturnType<typeof setTimeout>;
  private wasLeader = false;
  private disconnectedSince?: number;
  /** Last wills received: dead processes (instance -> when), adopted by the sweeper. */
  private readonly gone = new Map<string, number>();
  /** Replicas: the last wills of the others, on every session of this process. */
  private control?: BrokerSessionOptions["control"];

  private constructor(
    readonly registry: Registry,
    readonly fleet: FleetService,
    readonly http: HttpsApi | undefined,
    private readonly log: Logger,
    private readonly opts: FleetServerOptions,
    readonly clientId: string,
    /** Replicas only. */
    readonly replicas: ReplicaSet | undefined,
    /** Its Prometheus metrics and the dashboard's events (observe.ts). */
    readonly observers: FleetObservers,
    readonly sessions: DashboardSessions,
  ) {}

  /** The broker connection of this server's own session. */
  get client(): mqtt.MqttClient {
    return this.main.client;
  }

  get state(): FleetServerState {
    return this.main.state;
  }

  private get closeDrainMs(): number {
    return this.opts.closeDrainMs ?? 2000;
  }

  static async start(opts: FleetServerOptions): Promise<FleetServer> {
    const log = opts.logger ?? silentLogger;
    const registry = await openRegistry(
      opts.postgres
        ? { kind: "postgres", config: opts.postgres }
        : { kind: "sqlite", dataDir: opts.dataDir },
      { onError: (m) => log.warn(m) },
    );
    const shared = opts.sharedSubscription ?? false;
    const clientId = opts.clientId ?? SERVER_CLIENT_ID;
    const instance = `${clientId}/${crypto.randomUUID().slice(0, 8)}`;
    let replicas: ReplicaSet | undefined;
    try {
      if (shared && !opts.password) {
        throw new Error(
          "--shared-subscription needs the broker password (--mqtt-password-file): the replicas' " +
            "group name is derived from it, so that no robot can name the group and join it",
        );
      }
      if (shared && registry.dialect !== "postgres") {
        throw new Error(
          "--shared-subscription needs the PostgreSQL registry (--database postgres://...): " +
            "servers on SQLite each keep their own registry, so each would see only its share of " +
            "the robots' messages and mark the others' robots offline",
        );
      }
      if (registry.dialect === "postgres") {
        // What "committed before PUBACK" rests on is the server's: say so when it is not durable.
        const d = await registry.durability();
        for (const [k, bad] of [["synchronous_commit", "off"], ["fsync", "off"]]) {
          if (d[k] === bad) {
            log.warn(
              `${registry.location}: ${k}=${bad}: an acknowledged message can be lost if PostgreSQL crashes`,
            );
          }
        }
      }
      if (shared) {
        replicas = new ReplicaSet(registry, { clientId, instance, leaseMs: opts.leaseMs, log });
        await replicas.join();
      }
      // Claims of an earlier process of this client id (killed mid-publish): it is gone (one
      // process per client id; with replicas the join above took the id over), so its tasks
      // are sent again now rather than when its claims expire.
      const freed = await registry.transaction((tx) =>
        tx.releaseClaimsOf(`${clientId}/`, instance)
      );
      if (freed > 0) log.info(`${freed} task claim(s) of an earlier ${clientId} released`);
    } catch (err) {
      await registry.close();
      throw err;
    }
    // Replicas stamp everything with the database's clock (replicas.ts).
    const clock = replicas;
    const probeTopic = serverProbeTopic(clientId);
    let main: BrokerSession | undefined;
    const publisher = {
      publish: async (topic: string, payload: Uint8Array) => {
        await main!.client.publishAsync(topic, payload as Buffer, { qos: 1, retain: false });
      },
      connected: () => main?.client.connected ?? false,
    };
    const fleet = new FleetService(registry, publisher, {
      logger: log,
      probeTopic,
      instance,
      ...(clock ? { now: () => new Date(clock.now()), sharedClock: clock } : {}),
      ...opts.fleet,
      startDisconnected: true,
    });
    let http: HttpsApi | undefined;
    let s: FleetServer | undefined;
    const observers = observeFleet(fleet, {
      version: opts.version,
      mqtt: () => ({
        connected: main?.connected() ?? false,
        connects: main?.state.connects ?? 0,
      }),
      trustBundle: opts.trustBundle,
    });
    const sessions = new DashboardSessions(opts.dashboard);
    try {
      if (opts.http) {
        const h = opts.http;
        // The port is known once bound (port 0 in tests): Host checks read it then.
        let port = h.port;
        const handler = createHandler({
          fleet,
          mqttConnected: () => fleet.linkState().connected && (main?.connected() ?? false),
          replicas: replicas ? () => s?.replicaView() : undefined,
          registryProblem: replicas ? () => s?.registryProblem() : undefined,
          version: opts.version,
          auth: { trustDomain: h.trustDomain, bundles: h.bundles, roles: h.roles },
          hosts: {
            get port() {
              return port;
            },
            names: () => allowedHostNames(h.hostname, h.dnsNames(), h.interfaceAddresses ?? []),
          },
          logger: log,
          metrics: observers.metrics,
          events: observers.events,
          sessions,
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
      s = new FleetServer(
        registry,
        fleet,
        http,
        log,
        opts,
        clientId,
        replicas,
        observers,
        sessions,
      );
      const srv = s;
      if (shared) {
        // Every session of this process (an adopted one too: the dead replica's session holds
        // the wills queued for it) hands the replicas' last wills to the sweeper.
        srv.control = {
          filters: [SERVER_GONE_FILTER],
          match: (t: string) => /^k8s4r\/server\/[^/]+\/gone$/.test(t),
          handle: (_t: string, payload: Uint8Array) => {
            const dead = new TextDecoder().decode(payload);
            if (dead !== instance && dead.length <= 200 && !srv.gone.has(dead)) {
              log.info(`the broker published the last will of ${dead}`);
              srv.gone.set(dead, Date.now());
            }
          },
        };
      }
      main = srv.main = srv.session(clientId, {
        onUp: () => {
          fleet.linkUp();
          void fleet.dispatchAllOnline();
          if (shared) srv.readRetained();
        },
        onDown: () => fleet.linkDown(),
        onTakenOver: shared ? () => srv.mainTakenOver() : undefined,
        ...(shared ? { will: { topic: serverGoneTopic(clientId), payload: instance } } : {}),
      });
    } catch (err) {
      observers.close();
      await http?.close();
      await replicas?.leave();
      await registry.close();
      throw err;
    }
    s.startTimers();
    main.start();
    return s;
  }

  /** A broker session of `clientId` (ours, or an adopted replica's) feeding this fleet. */
  private session(
    clientId: string,
    hooks:
      & Pick<
        ConstructorParameters<typeof BrokerSession>[0],
        "onUp" | "onDown" | "onTakenOver" | "will"
      >
      & { reconnectPeriodMs?: number },
  ): BrokerSession {
    const o = this.opts;
    return new BrokerSession({
      brokerUrl: o.brokerUrl,
      clientId,
      username: o.username,
      password: o.password,
      tls: o.tls,
      subscriptions: [
        o.sharedSubscription ? sharedServerSubscription(o.password ?? "") : SERVER_SUBSCRIPTION,
      ],
      probeTopic: serverProbeTopic(clientId),
      probeIntervalMs: o.probeIntervalMs ?? 500,
      reconnectPeriodMs: hooks.reconnectPeriodMs ?? o.reconnectPeriodMs ?? 1000,
      now: () => this.fleet.now().getTime(),
      apply: (items) => this.fleet.handleBatch(items),
      log: this.log,
      onFatal: o.onFatal,
      ...(this.control ? { control: this.control } : {}),
      ...hooks,
    });
  }

  private startTimers(): void {
    const log = this.log;
    this.sweepTimer = setInterval(() => {
      if (this.sweeping || this.closed) return; // the last one is still running
      this.sweeping = (async () => {
        // What arrived is applied before silence is judged.
        await this.main.flush();
        for (const a of this.adoptions.values()) await a.flush();
        if (this.replicas) {
          // Cut from the broker: another replica should sweep (and adopt our session).
          if (!this.main.connected()) {
            this.disconnectedSince ??= Date.now();
            if (Date.now() - this.disconnectedSince > 2000) {
              await this.replicas.resign("not connected to the broker");
            }
            this.wasLeader = false;
            return;
          }
          this.disconnectedSince = undefined;
          const leader = await this.replicas.lead();
          if (!leader) {
            this.wasLeader = false;
            return;
          }
          if (!this.wasLeader) this.fleet.resetSweepGrace();
          this.wasLeader = true;
          await this.fleet.sweep();
          await this.adoptSessions();
          return;
        }
        await this.fleet.sweep();
      })().catch((err) => {
        log.warn(`sweep failed: ${(err as Error).message}`);
      }).finally(() => (this.sweeping = undefined));
    }, this.opts.sweepIntervalMs ?? 1000);
    if (this.replicas) {
      this.tickTimer = setInterval(() => {
        if (this.ticking || this.closed) return;
        this.ticking = this.tick().catch((err) => {
          log.warn(`replica tick failed: ${(err as Error).message}`);
        }).finally(() => (this.ticking = undefined));
      }, this.opts.replicaTickMs ?? 500);
    }
  }

  /** Renews the lease, records the probe clocks, and keeps away from the broker without it. */
  private async tick(): Promise<void> {
    const replicas = this.replicas!;
    const r = await replicas.tick(
      {
        clientId: this.clientId,
        confirmedAt: this.main.confirmedAt,
        linkUp: this.main.connected(),
      },
      [...this.adoptions].map(([id, a]) => ({
        clientId: id,
        confirmedAt: a.confirmedAt,
        linkUp: a.connected(),
      })),
    );
    if (!r.own) {
      this.fatal(
        `another server process took client id ${this.clientId} (its replica row names another instance): stopping`,
      );
      return;
    }
    for (const id of r.revoked) await this.dropAdoption(id, "its owner is back");
    for (const [dead, at] of this.gone) if (Date.now() - at > 300_000) this.gone.delete(dead);
    if (replicas.leaseLost()) {
      if (!this.main.paused) {
        this.log.warn(
          `replica ${this.clientId}: no lease for ${replicas.leaseMs} ms (${replicas.lastError}): ` +
            "leaving the broker until the registry answers (the broker keeps the session)",
        );
        this.main.pause();
        for (const id of [...this.adoptions.keys()]) await this.dropAdoption(id, "no lease");
      }
    } else if (this.main.paused && !this.closed) {
      this.log.info(`replica ${this.clientId}: lease renewed; back on the broker`);
      this.main.resume();
    }
  }

  private fatal(message: string): void {
    this.log.warn(message);
    this.opts.onFatal?.(new Error(message));
  }

  /** Someone connected with our client id: another process (stop), or an adopter (take back). */
  private mainTakenOver(): void {
    void (async () => {
      const r = await this.replicas!.tick(
        { clientId: this.clientId, confirmedAt: this.main.confirmedAt, linkUp: false },
        [],
      );
      if (!r.own) {
        this.fatal(`another server process took client id ${this.clientId}: stopping`);
        return;
      }
      await this.replicas!.join();
      this.main.resume();
    })().catch((err) => this.log.warn(`taking the session back: ${(err as Error).message}`));
  }

  /**
   * The sweeper connects as each replica that died (or lost the broker) and serves its share:
   * at once for a process whose last will the broker published, else once its lease has been
   * expired for ADOPT_AFTER_MS (or its link down and its clock stalled for ADOPT_STALLED_MS).
   */
  private async adoptSessions(): Promise<void> {
    const replicas = this.replicas!;
    if (this.closed || replicas.leaseLost() || !this.main.connected()) return;
    const todo: { row: ReplicaRow; why: Parameters<ReplicaSet["adopt"]>[1]; what: string }[] = [];
    const mine = () => new Set(this.adoptions.keys());
    for (const [dead, at] of [...this.gone]) {
      // Handled once; a will older than a few minutes is no news.
      this.gone.delete(dead);
      if (Date.now() - at > 300_000) continue;
      for (const row of replicas.orphansOf(dead, mine())) {
        todo.push({ row, why: { deadInstance: dead }, what: `its last will (${dead})` });
      }
    }
    for (const row of replicas.adoptable(ADOPT_AFTER_MS, ADOPT_STALLED_MS, mine())) {
      if (todo.some((t) => t.row.clientId === row.clientId)) continue;
      todo.push({
        row,
        why: row.expired ? { expiredForMs: ADOPT_AFTER_MS } : { stalledForMs: ADOPT_STALLED_MS },
        what: row.expired ? `lease expired ${row.expiredForMs} ms ago` : "cut from the broker",
      });
    }
    for (const { row, why, what } of todo) {
      if (this.adoptions.has(row.clientId)) continue;
      if (!(await replicas.adopt(row, why))) continue;
      this.log.info(
        `adopting the broker session of replica ${row.clientId} (${what}): its queued and ` +
          "in-flight messages are applied here until it comes back",
      );
      const id = row.clientId;
      const a = this.session(id, {
        onTakenOver: () => void this.dropAdoption(id, "its owner took the session back"),
        // Slower than an owner's: a live owner that connects again wins (and ends the adoption
        // in the registry) before this one is back.
        reconnectPeriodMs: 3 * (this.opts.replicaTickMs ?? 500),
      });
      this.adoptions.set(id, a);
      a.start();
      // Its task claims go with it: what it was publishing is sent again by the sweep (a robot
      // that got it already runs it once: it remembers task ids).
      const freed = await this.registry.transaction((tx) => tx.releaseClaimsOf(row.instance))
        .catch(() => 0);
      if (freed > 0) this.log.info(`released ${freed} task claim(s) of ${row.instance}`);
    }
  }

  private async dropAdoption(clientId: string, why: string): Promise<void> {
    const a = this.adoptions.get(clientId);
    if (!a) return;
    this.adoptions.delete(clientId);
    this.log.info(`releasing the session of replica ${clientId}: ${why}`);
    await a.drainReceived(this.closeDrainMs);
    await a.close(this.closeDrainMs, true);
    await this.replicas?.release(clientId);
  }

  /**
   * A shared subscription is sent no retained messages, and the robots' statuses are
   * retained: a robot that came online while no replica's session existed (the first start)
   * would be known only by its next heartbeat. So on every connect a short-lived plain
   * subscriber (clean session) reads the retained statuses, up to an echo of its own probe
   * (everything retained was sent before it), and they are applied like any status: a replay
   * of what was applied already is a no-op (`statusReplays`). Retried while it fails.
   */
  private readRetained(): void {
    if (this.retained || this.closed) return;
    clearTimeout(this.retainedRetry);
    this.retained = this.retainedOnce().then((ok) => {
      if (!ok && !this.closed) {
        this.retainedRetry = setTimeout(() => this.readRetained(), 5000);
      }
    }).finally(() => (this.retained = undefined));
  }

  private async retainedOnce(): Promise<boolean> {
    const o = this.opts;
    const id = `${this.clientId}-retained`;
    const probe = serverProbeTopic(id);
    const token = `${Date.now()}-${crypto.randomUUID()}`;
    let client: mqtt.MqttClient | undefined;
    const got: Incoming[] = [];
    try {
      client = await mqtt.connectAsync(o.brokerUrl, {
        clientId: id,
        clean: true,
        protocolVersion: 5,
        reconnectPeriod: 0,
        connectTimeout: 10_000,
        ...(o.username !== undefined ? { username: o.username, password: o.password } : {}),
        ...(o.tls ? { ...tlsOptions(o.tls.current()), rejectUnauthorized: true } : {}),
      });
      const c = client;
      const echoed = new Promise<void>((resolve) => {
        c.on("message", (topic, payload, packet) => {
          if (topic === probe) {
            if (payload.toString() === token) resolve();
          } else if (packet.retain) {
            got.push({ topic, payload: new Uint8Array(payload) });
          }
        });
      });
      await c.subscribeAsync([ROBOT_STATUS_FILTER, probe], { qos: 1 });
      await c.publishAsync(probe, token, { qos: 1 });
      if (!(await within(echoed, 30_000))) throw new Error("no echo of its probe in 30 s");
    } catch (err) {
      this.log.warn(`retained statuses: ${(err as Error).message}`);
      return false;
    } finally {
      client?.end(true);
    }
    for (let i = 0; i < got.length; i += 1000) {
      const r = await this.fleet.handleBatch(got.slice(i, i + 1000));
      if (r.error !== undefined) {
        this.log.warn(`retained statuses: ${r.error}`);
        return false;
      }
    }
    if (got.length) this.log.info(`retained statuses: ${got.length} read`);
    return true;
  }

  /** Replicas: what `/api/stats` shows (each replica, the fleet's clock, the sweeper). */
  replicaView(): unknown {
    const r = this.replicas;
    if (!r) return undefined;
    const clock = r.confirmedAt();
    return {
      self: this.clientId,
      sweeper: r.isLeader(),
      fleetConfirmedAt: clock === undefined ? null : new Date(clock).toISOString(),
      delivering: this.fleet.fleetDelivering(),
      adopted: [...this.adoptions.keys()],
      lease: r.leaseLost() ? `lost: ${r.lastError}` : "held",
      replicas: r.rows.map((x) => ({
        clientId: x.clientId,
        leaseUntil: x.leaseUntil,
        expired: x.expired,
        confirmedAt: x.confirmedAt,
        linkUp: x.linkUp,
        adoptedBy: x.adoptedBy,
      })),
    };
  }

  /** Replicas: the lease could not be renewed, and what the replica does meanwhile. */
  registryProblem(): string | undefined {
    const r = this.replicas;
    if (!r || r.failingSince === undefined || !r.leaseLost()) return undefined;
    return `no replica lease since ${new Date(r.failingSince).toISOString()} (${
      r.lastError ?? "failing"
    }): off the broker until the registry answers; the broker keeps the messages`;
  }

  connected(): boolean {
    return this.main.connected();
  }

  /** Resolves once connected and subscribed (rejects after `timeoutMs`). */
  waitConnected(timeoutMs: number): Promise<void> {
    return this.main.waitConnected(timeoutMs);
  }

  /**
   * Disconnects (the persistent session stays on the broker) and closes everything, in bounded
   * time: dispatches waiting for a PUBACK get `closeDrainMs`, the DISCONNECT as long again, then
   * the socket is destroyed. A task whose PUBACK never came stays pending/dispatched in the
   * registry and is sent again by the next start (robots dedupe by task id). A replica ends its
   * lease, so the sweeper adopts its session at once.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    // What was received is committed and acknowledged first (bounded: a database that does not
    // answer must not hold the shutdown; what is not acknowledged is delivered again).
    const sessions = [this.main, ...this.adoptions.values()];
    for (const x of sessions) {
      if (!await x.drainReceived(this.closeDrainMs)) {
        this.log.warn(`close: registry commit still pending after ${this.closeDrainMs} ms`);
      }
    }
    this.closed = true;
    clearInterval(this.sweepTimer);
    clearInterval(this.tickTimer);
    clearTimeout(this.retainedRetry);
    for (const x of sessions) x.stopTimers();
    this.observers.close();
    if (this.sweeping) await within(this.sweeping, this.closeDrainMs);
    if (this.ticking) await within(this.ticking, this.closeDrainMs);
    if (this.retained) await within(this.retained, this.closeDrainMs);
    await this.http?.close();
    const drained = await within(this.fleet.settled(), this.closeDrainMs);
    if (!drained) {
      this.log.warn(`close: dispatches still unacknowledged after ${this.closeDrainMs} ms`);
    }
    await Promise.all(sessions.map((x) => x.close(this.closeDrainMs, !drained)));
    // Tasks still claimed (a publish without its PUBACK): free for the next start or another
    // replica now (a robot that got one twice runs it once: it remembers task ids).
    await within(
      this.registry.transaction((tx) => tx.releaseClaimsOf(this.fleet.instance)).catch(() => {}),
      this.closeDrainMs,
    );
    for (const id of this.adoptions.keys()) await this.replicas?.release(id);
    this.adoptions.clear();
    await this.replicas?.leave();
    if (!await within(this.registry.close(), this.closeDrainMs)) {
      this.log.warn(`close: the registry did not close within ${this.closeDrainMs} ms`);
    }
  }

  /**
   * Tests only: what `kill -9` of the process leaves, seen from the broker and the database:
   * sockets closed without DISCONNECT, nothing acknowledged, flushed or written (no lease
   * ended, no adoption released), the sweeper lock gone with its connection.
   */
  async crash(): Promise<void> {
    this.closed = true;
    clearInterval(this.sweepTimer);
    clearInterval(this.tickTimer);
    clearTimeout(this.retainedRetry);
    this.main.crash();
    for (const a of this.adoptions.values()) a.crash();
    await this.replicas?.crash();
    await this.http?.close();
    await within(this.registry.close(), this.closeDrainMs);
  }
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
