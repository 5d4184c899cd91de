/**
 * The fleet server's HTTP API (JSON only). It is served over HTTPS with client certificates
 * (https.ts); every request passes the rules of auth.ts first: Host and Origin must be this
 * server's, every endpoint but /healthz needs an operator X.509 SVID with a role that allows
 * it (metrics: only /metrics; viewer: read; operator: also create and cancel), and mutating requests must be JSON.
 *
 *   GET  /healthz                      200 when MQTT is connected and the registry reads and
 *                                      writes, else 503 with `problems` (why; the errors in full
 *                                      only for an operator's certificate); counters (no auth;
 *                                      the registry's are at most 1 s old, health.ts)
 *   GET  /api/whoami                   {spiffeId, operator, role} of the caller
 *   GET  /api/stats                    counters
 *   GET  /api/robots                   {robots: [...]}
 *   GET  /api/robots/{id}              robot: state online|offline|unknown (+ unknownSince while
 *                                      the server is not connected to the broker), online (the
 *                                      last known value), lastSeen, offlineReason, ...
 *   GET  /api/robots/{id}/tasks        {tasks: [...], nextCursor} newest first (paged as below)
 *   POST /api/robots/{id}/tasks        {"command":[...],"timeoutSeconds":30,"env":{},"cwd":"/"}
 *                                      -> 201 {"id": "...", "state": "...", "createdBy": "..."}
 *   GET  /api/tasks                    ?robot=R&state=S&limit=N&cursor=C -> {tasks, nextCursor}
 *   GET  /api/tasks/{id}               task with state, exitCode, stdout, stderr, createdBy
 *   POST /api/tasks/{id}/cancel        {} -> 202 {"id", "state", "outcome"} (409 if finished)
 *   GET  /api/robots/{id}/heartbeats   {received, missing, recent: [{at, seq, missing}]}
 *   GET  /api/events                   {events: [...]} the newest fleet events (events.ts)
 *   GET  /api/events/stream            the same, live: Server-Sent Events (Last-Event-ID resumes)
 *   POST /api/dashboard/login          {} -> 201 {path, id, expiresAt}: a one-time dashboard login
 *                                      (client certificate only, not a browser session)
 *   GET  /api/dashboard/logins/{id}    {state: pending|used|expired|unknown} of a login this
 *                                      certificate asked for (the CLI removes its copy once used)
 *   GET  /metrics                      Prometheus text format (roles metrics, viewer, operator)
 *   GET  /dashboard/...                the dashboard (dashboard.ts): its assets need no identity,
 *                                      its data comes from the API above
 *
 * A browser authenticates with the session cookie of a dashboard login (sessions.ts) instead of
 * a certificate; its role is read from the roles config at each request, like a certificate's,
 * and its mutating requests must carry an Origin (checked as above).
 *
 * Paging: newest first; `limit` 1..1000 (default 100); `nextCursor` (null on the last page) is
 * passed back as `cursor`. Cursors are keyset positions, so a page never repeats or skips a
 * task when tasks are created meanwhile.
 *
 * Every answer of the API is `Cache-Control: no-store` (task env and output, robot details:
 * nothing a browser or a proxy should keep) and `X-Content-Type-Options: nosniff`.
 *
 * An event stream lives only as long as what opened it: its session or certificate and its
 * role are checked again every `streamRecheckMs` (1 s), and the stream ends when they no longer
 * allow it (logout, expiry, `operator remove`). A client that reads slower than events come is
 * cut off once `maxStreamBufferBytes` (256 KiB) wait for it (it resumes with Last-Event-ID);
 * one operator holds at most `maxStreamsPerOperator` (8) of the `maxStreams` (64).
 *
 * Errors are `{"error": "...", "code"?: "..."}` with 400 (bad input, precise message), 401 (no
 * or untrusted client certificate), 403 (not an operator, no or insufficient role, foreign
 * Host or Origin), 404, 405 (with Allow), 409, 413 (body over MAX_BODY_BYTES), 415 (mutating
 * request that is not application/json), 503 (roles config unusable) or 500.
 */
import type { X509Certificate } from "node:crypto";
import { FailedChainCache } from "../spiffe/verify.ts";
import {
  isTimestamp,
  MAX_COMMAND_ARGS,
  MAX_TIMEOUT_SECONDS,
  TASK_ID_RE,
} from "../mqtt/messages.ts";
import { isRobotId } from "../fleet/topics.ts";
import {
  authorize,
  type AuthPolicy,
  type Caller,
  checkContentType,
  checkHost,
  checkOrigin,
  type HostPolicy,
  identify,
  MUTATING_METHODS,
  type Refusal,
  type RefusalCode,
  type VerifiedConnection,
} from "./auth.ts";
import {
  ConflictError,
  type FleetService,
  type Logger,
  NotFoundError,
  silentLogger,
  type TaskRequest,
} from "./fleet.ts";
import type { TaskCursor, TaskQuery, TaskRecord } from "./registry.ts";
import type { Permission } from "./roles.ts";
import { isTaskState, TASK_STATES } from "./tasks.ts";
import { MAX_TASK_TTL_SECONDS } from "../fleet/task_limits.ts";
import { type MetricsRenderer, metricsResponse } from "../metrics/mod.ts";
import { type FleetEvents, sseFrame } from "./events.ts";
import { type DashboardSessions, sessionCookie } from "./sessions.ts";
import { dashboardRoute } from "./dashboard.ts";
import { HealthView } from "./health.ts";

export const MAX_BODY_BYTES = 64 * 1024;
/** The robots' replay window is as long (src/fleet/task_limits.ts): a task never outlives it. */
export const MAX_TTL_SECONDS = MAX_TASK_TTL_SECONDS;

class HttpError extends Error {
  constructor(readonly status: number, message: string, readonly headers: HeadersInit = {}) {
    super(message);
  }
}

/** Headers of every API answer: nothing to keep in a cache, nothing to sniff as HTML. */
export const API_HEADERS: Readonly<Record<string, string>> = {
  "cache-control": "no-store",
  "x-content-type-options": "nosniff",
};

function json(status: number, body: unknown, headers: HeadersInit = {}): Response {
  return new Response(JSON.stringify(body, null, 2) + "\n", {
    status,
    headers: { "content-type": "application/json; charset=utf-8", ...API_HEADERS, ...headers },
  });
}

/** Parses and checks a task creation body. Messages name the field and what was expected. */
export function parseTaskRequest(body: unknown): TaskRequest {
  const bad = (msg: string): never => {
    throw new HttpError(400, msg);
  };
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    bad("body: expected a JSON object");
  }
  const b = body as Record<string, unknown>;
  const known = new Set(["command", "timeoutSeconds", "env", "cwd", "ttlSeconds"]);
  for (const k of Object.keys(b)) {
    if (!known.has(k)) bad(`${k}: unknown field (expected ${[...known].join(", ")})`);
  }
  const cmd = b.command;
  if (!Array.isArray(cmd) || cmd.length === 0 || cmd.length > MAX_COMMAND_ARGS) {
    bad(`command: expected a non-empty array of at most ${MAX_COMMAND_ARGS} strings (argv)`);
  }
  (cmd as unknown[]).forEach((a, i) => {
    if (typeof a !== "string") bad(`command[${i}]: expected a string, got ${typeof a}`);
    if ((a as string).includes("\0")) bad(`command[${i}]: must not contain NUL`);
  });
  if ((cmd as string[])[0] === "") bad("command[0]: expected a non-empty program name");
  const int = (key: string, min: number, max: number, dflt?: number): number | undefined => {
    const v = b[key];
    if (v === undefined) return dflt;
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
      bad(`${key}: expected an integer in [${min}, ${max}], got ${JSON.stringify(v)}`);
    }
    return v as number;
  };
  const req: TaskRequest = {
    command: cmd as string[],
    env: {},
    timeoutSeconds: int("timeoutSeconds", 1, MAX_TIMEOUT_SECONDS, 60)!,
  };
  const ttl = int("ttlSeconds", 1, MAX_TTL_SECONDS);
  if (ttl !== undefined) req.ttlSeconds = ttl;
  if (b.env !== undefined) {
    if (typeof b.env !== "object" || b.env === null || Array.isArray(b.env)) {
      bad("env: expected an object of string values");
    }
    for (const [k, v] of Object.entries(b.env as Record<string, unknown>)) {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k)) {
        bad(`env: invalid variable name ${JSON.stringify(k)} (expected [A-Za-z_][A-Za-z0-9_]*)`);
      }
      if (typeof v !== "string") bad(`env.${k}: expected a string, got ${typeof v}`);
      req.env[k] = v as string;
    }
  }
  if (b.cwd !== undefined) {
    if (typeof b.cwd !== "string" || !b.cwd.startsWith("/") || b.cwd.includes("\0")) {
      bad(`cwd: expected an absolute path, got ${JSON.stringify(b.cwd)}`);
    }
    req.cwd = b.cwd as string;
  }
  return req;
}

async function readBody(req: Request, opts: { allowEmpty?: boolean } = {}): Promise<unknown> {
  const len = req.headers.get("content-length");
  if (len !== null && Number(len) > MAX_BODY_BYTES) {
    throw new HttpError(413, `body: larger than ${MAX_BODY_BYTES} bytes`);
  }
  const chunks: Uint8Array[] = [];
  let total = 0;
  if (req.body) {
    const reader = req.body.getReader();
    while (true) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.byteLength;
      if (total > MAX_BODY_BYTES) {
        await reader.cancel().catch(() => {});
        throw new HttpError(413, `body: larger than ${MAX_BODY_BYTES} bytes`);
      }
      chunks.push(value);
    }
  }
  const buf = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    buf.set(c, off);
    off += c.byteLength;
  }
  const text = new TextDecoder().decode(buf);
  if (text.trim() === "") {
    if (opts.allowEmpty) return undefined;
    throw new HttpError(400, "body: expected a JSON object, got nothing");
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new HttpError(400, `body: invalid JSON: ${(err as Error).message}`);
  }
}

export function taskView(t: TaskRecord) {
  return {
    id: t.id,
    robotId: t.robotId,
    state: t.state,
    command: t.command,
    env: t.env,
    cwd: t.cwd,
    timeoutSeconds: t.timeoutSeconds,
    exitCode: t.exitCode,
    stdout: t.stdout ?? "",
    stderr: t.stderr ?? "",
    error: t.error,
    createdAt: t.createdAt,
    expiresAt: t.expiresAt,
    dispatchedAt: t.dispatchedAt,
    acceptedAt: t.acceptedAt,
    startedAt: t.startedAt,
    finishedAt: t.finishedAt,
    updatedAt: t.updatedAt,
    dispatchCount: t.dispatchCount,
    createdBy: t.createdBy,
    cancelRequestedAt: t.cancelRequestedAt,
    cancelRequestedBy: t.cancelRequestedBy,
  };
}

/** A cursor is the (createdAt, id) of the last task of a page, opaque to clients. */
export function encodeCursor(c: TaskCursor): string {
  return btoa(JSON.stringify([c.createdAt, c.id])).replace(/\+/g, "-").replace(/\//g, "_")
    .replace(/=+$/, "");
}

export function decodeCursor(s: string): TaskCursor {
  try {
    const v = JSON.parse(atob(s.replace(/-/g, "+").replace(/_/g, "/")));
    if (
      Array.isArray(v) && v.length === 2 && typeof v[0] === "string" && isTimestamp(v[0]) &&
      typeof v[1] === "string" && TASK_ID_RE.test(v[1])
    ) return { createdAt: v[0], id: v[1] };
  } catch { /* below */ }
  throw new HttpError(
    400,
    `cursor: expected a nextCursor from a previous page, got ${JSON.stringify(s.slice(0, 80))}`,
  );
}

export const MAX_PAGE = 1000;
export const DEFAULT_PAGE = 100;

/** Reads the paging and filter parameters of a task list. */
export function parseTaskQuery(params: URLSearchParams, robotId?: string): TaskQuery {
  const known = new Set(["robot", "state", "limit", "cursor"]);
  for (const k of params.keys()) {
    if (!known.has(k)) {
      throw new HttpError(400, `${k}: unknown query parameter (expected ${[...known].join(", ")})`);
    }
  }
  const q: TaskQuery = { limit: DEFAULT_PAGE };
  const robot = params.get("robot");
  if (robot !== null) {
    if (!isRobotId(robot)) {
      throw new HttpError(
        400,
        `robot: expected a robot id like robot-001, got ${JSON.stringify(robot)}`,
      );
    }
    if (robotId !== undefined && robot !== robotId) {
      throw new HttpError(400, `robot: ${robot} differs from the robot of the path (${robotId})`);
    }
    q.robotId = robot;
  }
  if (robotId !== undefined) q.robotId = robotId;
  const state = params.get("state");
  if (state !== null) {
    if (!isTaskState(state)) {
      throw new HttpError(
        400,
        `state: expected one of ${TASK_STATES.join(", ")}, got ${JSON.stringify(state)}`,
      );
    }
    q.state = state;
  }
  const limit = params.get("limit");
  if (limit !== null) {
    const n = /^\d{1,7}$/.test(limit) ? Number(limit) : NaN;
    if (!(n >= 1 && n <= MAX_PAGE)) {
      throw new HttpError(
        400,
        `limit: expected an integer in [1, ${MAX_PAGE}], got ${JSON.stringify(limit)}`,
      );
    }
    q.limit = n;
  }
  const cursor = params.get("cursor");
  if (cursor !== null && cursor !== "") q.after = decodeCursor(cursor);
  return q;
}

/**
 * The connection a request came on: the client's certificate chain (leaf first), if any, and
 * the connection's verification, kept for its next requests (auth.ts `VerifiedConnection`).
 */
export interface ConnInfo extends VerifiedConnection {
  peerChain?: X509Certificate[];
}

/** How long /healthz waits for the registry's counts before it says the registry is down. */
export const HEALTH_REGISTRY_TIMEOUT_MS = 1500;

/** Refusals by rule since the start, for /api/stats (attacks are counted, not only refused). */
export type RefusalCounters = Record<RefusalCode, number>;

export interface ApiContext {
  fleet: FleetService;
  mqttConnected: () => boolean;
  /** Replicas (PostgreSQL, shared subscription): their shared state, for /api/stats. */
  replicas?: () => unknown;
  /**
   * Why the registry is not usable (a replica that cannot renew its lease), for /healthz;
   * undefined while it is fine. /healthz also reads the registry itself, bounded.
   */
  registryProblem?: () => string | undefined;
  /** /healthz reads the registry's counters at most this often (health.ts). Default 1000 ms. */
  healthRefreshMs?: number;
  version?: string;
  /** Who the caller is and what it may do (auth.ts). */
  auth: AuthPolicy;
  /** Which Host and Origin are this server's. */
  hosts: HostPolicy;
  logger?: Logger;
  /** `GET /metrics` (observe.ts); absent: 404. */
  metrics?: MetricsRenderer;
  /** The events timeline (observe.ts); absent: empty. */
  events?: FleetEvents;
  /** Dashboard logins and browser sessions; absent: no dashboard login. */
  sessions?: DashboardSessions;
  /** Most SSE streams open at once (each holds a connection). Default 64. */
  maxStreams?: number;
  /** Most SSE streams one operator holds at once. Default 8. */
  maxStreamsPerOperator?: number;
  /** Bytes an SSE stream may hold for a slow reader before it is cut off. Default 256 KiB. */
  maxStreamBufferBytes?: number;
  /** How often an open SSE stream checks its session or certificate and role. Default 1000. */
  streamRecheckMs?: number;
}

/** How the caller proved who it is. */
export type AuthMethod = "certificate" | "session";

interface Route {
  perm: Permission;
  allowed: string[];
  /** Only with a client certificate (minting a dashboard login). */
  certificateOnly?: boolean;
  run: (caller: StreamCaller) => Promise<Response> | Response;
}

/** The caller of a route, and whether what authenticated it still allows the route now. */
type StreamCaller = Caller & { via: AuthMethod; until?: number; stillAllowed: () => boolean };

/** The request handler, separate from the listener so tests can call it directly. */
export function createHandler(
  ctx: ApiContext,
): ((req: Request, conn?: ConnInfo) => Promise<Response>) & { refusals: RefusalCounters } {
  const { fleet } = ctx;
  const log = ctx.logger ?? silentLogger;
  // Refused client chains are remembered across connections (a connection keeps its success).
  const authPolicy: AuthPolicy = { failures: new FailedChainCache(), ...ctx.auth };
  const refusals: RefusalCounters = {
    "bad-host": 0,
    "bad-origin": 0,
    "no-certificate": 0,
    "untrusted-certificate": 0,
    "superseded-certificate": 0,
    "not-an-operator": 0,
    "no-role": 0,
    "forbidden": 0,
    "roles-unavailable": 0,
    "unsupported-media-type": 0,
  };
  const robotOr404 = async (id: string) => {
    const r = isRobotId(id) ? await fleet.registry.getRobot(id) : undefined;
    if (!r) throw new HttpError(404, `unknown robot ${JSON.stringify(id)}`);
    return r;
  };
  // /healthz: cached counters, never a database read per call (health.ts).
  const health = new HealthView({
    fleet,
    mqttConnected: ctx.mqttConnected,
    version: ctx.version,
    // The replicas' view names their errors (the database): for operators (and /api/stats).
    extra: (detailed) => ({
      http: { refused: refusals },
      ...(ctx.replicas && detailed ? { replicas: ctx.replicas() } : {}),
    }),
    problems: (detailed) => {
      const rp = ctx.registryProblem?.();
      if (!rp) return [];
      return [
        detailed
          ? `registry: ${rp}`
          : "registry: this replica lost its lease: off the broker until the registry answers; see the server's log",
      ];
    },
    readTimeoutMs: HEALTH_REGISTRY_TIMEOUT_MS,
    refreshMs: ctx.healthRefreshMs,
  });
  /** An operator with a role may see the details of /healthz's problems (nothing is refused). */
  const operatorCalling = (conn: ConnInfo): boolean => {
    if (!conn.peerChain?.length) return false;
    const who = identify(conn.peerChain, authPolicy, conn);
    return who.ok && authorize(who, "read", ctx.auth.roles).ok;
  };
  // since: when the link went up (subscribed) or down; robots are unknown while it is down.
  // delivering: the broker echoed the server's probe lately (false while it is frozen).
  const mqttView = () => {
    const link = fleet.linkState();
    return {
      connected: ctx.mqttConnected(),
      since: link.since,
      delivering: link.delivering,
      confirmedAt: link.confirmedAt,
    };
  };
  const stats = async () => {
    const all = await fleet.registry.listRobots();
    const tasks = await fleet.registry.countTasksByState();
    return {
      mqtt: mqttView(),
      messages: fleet.stats,
      tasks,
      robots: {
        total: all.length,
        /** Last known: while the link is down these are also counted as unknown. */
        online: all.filter((r) => r.online).length,
        unknown: fleet.fleetDelivering() ? 0 : all.length,
      },
      http: { refused: refusals },
      ...(ctx.replicas ? { replicas: ctx.replicas() } : {}),
    };
  };
  const page = async (q: TaskQuery) => {
    const rows = await fleet.registry.listTasksPage({ ...q, limit: q.limit + 1 });
    const more = rows.length > q.limit;
    const tasks = more ? rows.slice(0, q.limit) : rows;
    const last = tasks[tasks.length - 1];
    return {
      tasks: tasks.map(taskView),
      nextCursor: more && last ? encodeCursor({ createdAt: last.createdAt, id: last.id }) : null,
    };
  };
  const read = (run: () => Promise<unknown>): Route => ({
    perm: "read",
    allowed: ["GET", "HEAD"],
    run: async () => json(200, await run()),
  });
  let streams = 0;
  const streamsOf = new Map<string, number>();
  const maxStreams = ctx.maxStreams ?? 64;
  const maxPerOperator = ctx.maxStreamsPerOperator ?? 8;
  const maxBuffer = ctx.maxStreamBufferBytes ?? 256 * 1024;
  const recheckMs = ctx.streamRecheckMs ?? 1000;
  /**
   * Server-Sent Events: what happened since Last-Event-ID, then live, with a ping every 15 s,
   * while the caller is still allowed, and while it keeps up.
   */
  const eventStream = (req: Request, url: URL, caller: StreamCaller): Response => {
    const events = ctx.events;
    if (!events) throw new HttpError(404, "no event stream on this server");
    if (streams >= maxStreams) {
      throw new HttpError(503, `too many event streams open (${maxStreams}); try again later`);
    }
    const who = caller.spiffeId;
    if ((streamsOf.get(who) ?? 0) >= maxPerOperator) {
      throw new HttpError(
        503,
        `too many event streams open for ${caller.operator} (${maxPerOperator}); close one`,
      );
    }
    const last = Number(req.headers.get("last-event-id") ?? url.searchParams.get("since") ?? "");
    const enc = new TextEncoder();
    let unsubscribe = () => {};
    let ping: ReturnType<typeof setInterval> | undefined;
    let recheck: ReturnType<typeof setInterval> | undefined;
    streams++;
    streamsOf.set(who, (streamsOf.get(who) ?? 0) + 1);
    let counted = true;
    const release = () => {
      if (counted) {
        streams--;
        const n = (streamsOf.get(who) ?? 1) - 1;
        if (n > 0) streamsOf.set(who, n);
        else streamsOf.delete(who);
      }
      counted = false;
      unsubscribe();
      clearInterval(ping);
      clearInterval(recheck);
    };
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        const end = (why: string, err?: Error) => {
          if (!counted) return;
          release();
          log.info(`event stream of ${who} ended: ${why}`);
          try {
            if (err) controller.error(err);
            else controller.close();
          } catch { /* already closed */ }
        };
        const send = (text: string) => {
          if (!counted) return;
          try {
            controller.enqueue(enc.encode(text));
          } catch {
            release();
            return;
          }
          // The queue holds what the client has not read yet: a reader that does not keep up
          // is cut off (its EventSource reconnects with Last-Event-ID), not buffered forever.
          if ((controller.desiredSize ?? 0) < 0) {
            end(
              `more than ${maxBuffer} bytes unread`,
              new Error("event stream reader too slow"),
            );
          }
        };
        send(`retry: 2000\n: k8s4r events\n\n`);
        const backlog = Number.isInteger(last) && last > 0 ? events.since(last) : [];
        for (const e of backlog) send(sseFrame(e));
        unsubscribe = events.subscribe((e) => send(sseFrame(e)));
        ping = setInterval(() => send(`: ping\n\n`), 15_000);
        // Logout, the session's or the certificate's end, a role removed: the stream ends too.
        recheck = setInterval(() => {
          let ok = false;
          try {
            ok = caller.stillAllowed();
          } catch { /* not allowed */ }
          if (!ok) end("no longer allowed (logout, expiry or role)");
        }, recheckMs);
      },
      cancel() {
        release();
      },
    }, { highWaterMark: maxBuffer, size: (chunk) => chunk.byteLength });
    req.signal?.addEventListener("abort", release, { once: true });
    return new Response(body, {
      status: 200,
      headers: {
        "content-type": "text/event-stream; charset=utf-8",
        ...API_HEADERS,
        "x-accel-buffering": "no",
      },
    });
  };

  /** Which endpoint, what it needs, and what it does; undefined = 404. */
  const route = (req: Request, url: URL, parts: string[]): Route | undefined => {
    if (url.pathname === "/metrics" && ctx.metrics) {
      const m = ctx.metrics;
      return { perm: "metrics", allowed: ["GET", "HEAD"], run: () => metricsResponse(req, m) };
    }
    if (parts[0] !== "api") return undefined;
    if (parts.length === 2 && parts[1] === "whoami") {
      return {
        perm: "read",
        allowed: ["GET", "HEAD"],
        run: (c) =>
          json(200, { spiffeId: c.spiffeId, operator: c.operator, role: c.role, via: c.via }),
      };
    }
    if (parts.length === 2 && parts[1] === "stats") return read(stats);
    if (parts[1] === "events") {
      if (parts.length === 2) {
        return read(() => {
          const limit = Number(url.searchParams.get("limit") ?? "100");
          if (!Number.isInteger(limit) || limit < 1 || limit > 1000) {
            throw new HttpError(400, `limit: expected an integer in [1, 1000]`);
          }
          return Promise.resolve({ events: ctx.events?.recent(limit) ?? [] });
        });
      }
      if (parts.length === 3 && parts[2] === "stream") {
        return { perm: "read", allowed: ["GET"], run: (c) => eventStream(req, url, c) };
      }
      return undefined;
    }
    if (parts[1] === "dashboard" && parts.length === 3 && parts[2] === "login") {
      const sessions = ctx.sessions;
      if (!sessions) return undefined;
      return {
        perm: "read",
        allowed: ["POST"],
        certificateOnly: true,
        run: async (caller) => {
          const body = await readBody(req, { allowEmpty: true });
          if (
            body !== undefined &&
            (typeof body !== "object" || body === null || Array.isArray(body) ||
              Object.keys(body).length > 0)
          ) {
            throw new HttpError(400, "body: expected {} or nothing");
          }
          const t = sessions.issueLogin(
            { ...caller, issuedAt: caller.issuedAt?.getTime() },
            caller.until,
          );
          log.info(
            `dashboard login issued for ${caller.spiffeId} (one use, until ${
              new Date(t.expiresAt).toISOString()
            })`,
          );
          return json(201, {
            path: `/dashboard/login?token=${t.token}`,
            id: t.id,
            expiresAt: new Date(t.expiresAt).toISOString(),
            operator: caller.operator,
            role: caller.role,
          }, { "cache-control": "no-store" });
        },
      };
    }
    if (parts[1] === "dashboard" && parts.length === 4 && parts[2] === "logins") {
      const sessions = ctx.sessions;
      if (!sessions) return undefined;
      return {
        perm: "read",
        allowed: ["GET", "HEAD"],
        certificateOnly: true,
        run: (caller) => json(200, { state: sessions.loginState(parts[3], caller.spiffeId) }),
      };
    }
    if (parts[1] === "robots") {
      if (parts.length === 2) {
        return read(async () => ({
          robots: (await fleet.registry.listRobots()).map((r) => fleet.robotView(r)),
        }));
      }
      if (parts.length === 3) return read(async () => fleet.robotView(await robotOr404(parts[2])));
      if (parts.length === 4 && parts[3] === "heartbeats") {
        return read(async () => {
          const robot = await robotOr404(parts[2]);
          return {
            robotId: robot.id,
            received: robot.heartbeatsReceived,
            missing: robot.heartbeatsMissing,
            intervalSeconds: robot.heartbeatIntervalSeconds ?? null,
            recent: ctx.events?.heartbeats(robot.id) ?? [],
          };
        });
      }
      if (parts.length === 4 && parts[3] === "tasks") {
        if (req.method === "POST") {
          return {
            perm: "write",
            allowed: ["GET", "HEAD", "POST"],
            run: async (caller) => {
              const robot = await robotOr404(parts[2]);
              const body = parseTaskRequest(await readBody(req));
              const task = await fleet.createTask(robot.id, body, caller.spiffeId);
              log.info(`task ${task.id} created on ${robot.id} by ${caller.spiffeId}`);
              return json(201, { id: task.id, state: task.state, createdBy: task.createdBy }, {
                location: `/api/tasks/${task.id}`,
              });
            },
          };
        }
        return {
          ...read(async () => {
            const robot = await robotOr404(parts[2]);
            return await page(parseTaskQuery(url.searchParams, robot.id));
          }),
          allowed: ["GET", "HEAD", "POST"],
        };
      }
      return undefined;
    }
    if (parts[1] === "tasks") {
      if (parts.length === 2) return read(() => page(parseTaskQuery(url.searchParams)));
      if (parts.length === 3) {
        return read(async () => {
          const t = await fleet.registry.getTask(parts[2]);
          if (!t) throw new HttpError(404, `unknown task ${JSON.stringify(parts[2])}`);
          return taskView(t);
        });
      }
      if (parts.length === 4 && parts[3] === "cancel") {
        return {
          perm: "write",
          allowed: ["POST"],
          run: async (caller) => {
            const body = await readBody(req, { allowEmpty: true });
            if (body !== undefined) {
              if (typeof body !== "object" || body === null || Array.isArray(body)) {
                throw new HttpError(400, "body: expected a JSON object ({}) or nothing");
              }
              const extra = Object.keys(body);
              if (extra.length) {
                throw new HttpError(400, `${extra[0]}: unknown field (expected none)`);
              }
            }
            const r = await fleet.cancelTask(parts[2], caller.spiffeId);
            return json(202, { id: r.task.id, state: r.task.state, outcome: r.outcome });
          },
        };
      }
    }
    return undefined;
  };

  // Anyone who can connect can be refused: one log line per reason per 10 s, the rest counted.
  const lastLogged = new Map<RefusalCode, { at: number; suppressed: number }>();
  const refused = (r: Refusal, req: Request, url: URL, who?: string): Response => {
    refusals[r.code]++;
    const now = Date.now();
    const l = lastLogged.get(r.code);
    if (!l || now - l.at >= 10_000) {
      log.warn(
        `refused ${req.method} ${url.pathname}${who ? ` from ${who}` : ""}: ${r.code}: ${r.error}${
          l?.suppressed ? ` (and ${l.suppressed} more ${r.code} since the last line)` : ""
        }`,
      );
      lastLogged.set(r.code, { at: now, suppressed: 0 });
    } else {
      l.suppressed++;
    }
    return json(r.status, { error: r.error, code: r.code });
  };

  const handler = async (req: Request, conn: ConnInfo = {}): Promise<Response> => {
    let url: URL;
    try {
      url = new URL(req.url);
    } catch {
      return json(400, { error: "request URL: malformed" });
    }
    try {
      // 1-2. Only requests meant for this server, from this server's origin (or no browser).
      const where = checkHost(req, ctx.hosts) ?? checkOrigin(req, ctx.hosts);
      if (where) return refused(where, req, url);
      const parts = url.pathname.split("/").filter((p) => p !== "").map(decodeURIComponent);
      if (url.pathname === "/healthz") {
        if (!["GET", "HEAD"].includes(req.method)) {
          throw new HttpError(405, `method ${req.method} not allowed (allowed: GET, HEAD)`, {
            allow: "GET, HEAD",
          });
        }
        return json(...(await health.answer(operatorCalling(conn))));
      }
      // The dashboard's pages and its one-time login (the token is the credential).
      if (parts[0] === "dashboard") {
        return await dashboardRoute(req, url, { sessions: ctx.sessions, logger: log });
      }
      // 3. Who is calling: an operator, by a certificate that chains to the bundle, or by the
      // session cookie of a dashboard login (a browser has no certificate).
      let via: AuthMethod = "certificate";
      let who = identify(conn.peerChain, authPolicy, conn);
      let until = conn.verified?.until;
      const cookie = sessionCookie(req);
      if (!who.ok && who.refusal.code === "no-certificate" && ctx.sessions) {
        const s = ctx.sessions.lookup(cookie);
        if (s) {
          // A session carries the notBefore of the certificate it began with (0: unknown, so
          // refused once the operator has an issuedAfter).
          who = {
            ok: true,
            spiffeId: s.spiffeId,
            operator: s.operator,
            issuedAt: new Date(s.issuedAt ?? 0),
          };
          via = "session";
          until = s.expiresAt;
        }
      }
      if (!who.ok) return refused(who.refusal, req, url);
      const r = route(req, url, parts);
      if (!r) throw new HttpError(404, `no such endpoint ${url.pathname}`);
      if (r.certificateOnly && via !== "certificate") {
        return refused(
          {
            status: 403,
            code: "forbidden",
            error:
              `${url.pathname} needs a client certificate (k8s4r dashboard), not a browser session`,
          },
          req,
          url,
          who.spiffeId,
        );
      }
      // A browser's cookie rides along with any request to us: a mutating one must say where it
      // comes from (its Origin was checked above when present; here it must be present).
      if (via === "session" && MUTATING_METHODS.has(req.method) && !req.headers.get("origin")) {
        return refused(
          {
            status: 403,
            code: "bad-origin",
            error: `${req.method} with a session cookie needs an Origin header (this server's)`,
          },
          req,
          url,
          who.spiffeId,
        );
      }
      if (!r.allowed.includes(req.method)) {
        throw new HttpError(
          405,
          `method ${req.method} not allowed (allowed: ${r.allowed.join(", ")})`,
          { allow: r.allowed.join(", ") },
        );
      }
      // 4. Whether its role allows this endpoint (deny by default).
      const auth = authorize(who, r.perm, ctx.auth.roles);
      if (!auth.ok) return refused(auth.refusal, req, url, who.spiffeId);
      // 5. Mutating requests carry JSON, nothing a cross-origin form can send.
      const ct = checkContentType(req);
      if (ct) return refused(ct, req, url, who.spiffeId);
      const id = who.spiffeId;
      const perm = r.perm;
      // For what outlives this request (an event stream): the same checks, again, later.
      const stillAllowed = () => {
        const again = via === "session"
          ? (ctx.sessions?.lookup(cookie)?.spiffeId === id ? who : undefined)
          : identify(conn.peerChain, ctx.auth, conn);
        return !!again?.ok && again.spiffeId === id &&
          authorize(again, perm, ctx.auth.roles).ok;
      };
      const res = await r.run({ ...auth.caller, via, until, stillAllowed });
      // Every API answer (the metrics page too) is kept by no cache.
      for (const [k, v] of Object.entries(API_HEADERS)) {
        if (!res.headers.has(k)) res.headers.set(k, v);
      }
      return res;
    } catch (err) {
      if (err instanceof HttpError) return json(err.status, { error: err.message }, err.headers);
      if (err instanceof NotFoundError) return json(404, { error: err.message });
      if (err instanceof ConflictError) return json(409, { error: err.message });
      if (err instanceof URIError) return json(400, { error: "path: invalid percent-encoding" });
      return json(500, { error: `internal error: ${(err as Error).message}` });
    }
  };
  return Object.assign(handler, { refusals });
}

/** Parses `host:port` (`127.0.0.1:8090`, `[::1]:8090`, `:0`). */
export function parseHostPort(addr: string, label = "--http-addr"): {
  hostname: string;
  port: number;
} {
  const m = /^(?:\[([0-9a-fA-F:]+)\]|([^:]*)):(\d{1,5})$/.exec(addr);
  if (!m || Number(m[3]) > 65535) {
    throw new Error(
      `${label}: expected HOST:PORT like 127.0.0.1:8090, got ${JSON.stringify(addr)}`,
    );
  }
  return { hostname: m[1] ?? (m[2] || "127.0.0.1"), port: Number(m[3]) };
}
