/**
 * The fleet server's HTTP API (JSON only), served with `Deno.serve` on loopback by default.
 *
 *   GET  /healthz                      200 when MQTT is connected, else 503; counters
 *   GET  /api/stats                    counters
 *   GET  /api/robots                   {robots: [...]}
 *   GET  /api/robots/{id}              robot: state online|offline|unknown (+ unknownSince while
 *                                      the server is not connected to the broker), online (the
 *                                      last known value), lastSeen, offlineReason, ...
 *   GET  /api/robots/{id}/tasks        {tasks: [...]} newest first
 *   POST /api/robots/{id}/tasks        {"command":[...],"timeoutSeconds":30,"env":{},"cwd":"/"}
 *                                      -> 201 {"id": "...", "state": "..."}
 *   GET  /api/tasks/{id}               task with state, exitCode, stdout, stderr
 *
 * Errors are `{"error": "..."}` with 400 (bad input, precise message), 404, 405 (with Allow),
 * 413 (body over MAX_BODY_BYTES) or 500.
 */
import { MAX_COMMAND_ARGS, MAX_TIMEOUT_SECONDS } from "../mqtt/messages.ts";
import { isRobotId } from "../fleet/topics.ts";
import { type FleetService, NotFoundError, type TaskRequest } from "./fleet.ts";
import type { TaskRecord } from "./registry.ts";

export const MAX_BODY_BYTES = 64 * 1024;
export const MAX_TTL_SECONDS = 7 * 24 * 3600;

class HttpError extends Error {
  constructor(readonly status: number, message: string, readonly headers: HeadersInit = {}) {
    super(message);
  }
}

function json(status: number, body: unknown, headers: HeadersInit = {}): Response {
  return new Response(JSON.stringify(body, null, 2) + "\n", {
    status,
    headers: { "content-type": "application/json; charset=utf-8", ...headers },
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

async function readBody(req: Request): Promise<unknown> {
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
  if (text.trim() === "") throw new HttpError(400, "body: expected a JSON object, got nothing");
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
  };
}

export interface ApiContext {
  fleet: FleetService;
  mqttConnected: () => boolean;
  version?: string;
}

/** The request handler, separate from the listener so tests can call it directly. */
export function createHandler(ctx: ApiContext): (req: Request) => Promise<Response> {
  const { fleet } = ctx;
  const methods = (req: Request, allowed: string[]) => {
    if (!allowed.includes(req.method)) {
      throw new HttpError(
        405,
        `method ${req.method} not allowed (allowed: ${allowed.join(", ")})`,
        {
          allow: allowed.join(", "),
        },
      );
    }
  };
  const robotOr404 = async (id: string) => {
    const r = isRobotId(id) ? await fleet.registry.getRobot(id) : undefined;
    if (!r) throw new HttpError(404, `unknown robot ${JSON.stringify(id)}`);
    return r;
  };
  const stats = async () => {
    const link = fleet.linkState();
    const all = await fleet.registry.listRobots();
    const tasks = await fleet.registry.countTasksByState();
    return {
      // since: when the link went up (subscribed) or down; robots are unknown while it is down.
      // delivering: the broker echoed the server's probe lately (false while it is frozen).
      mqtt: {
        connected: ctx.mqttConnected(),
        since: link.since,
        delivering: link.delivering,
        confirmedAt: link.confirmedAt,
      },
      messages: fleet.stats,
      tasks,
      robots: {
        total: all.length,
        /** Last known: while the link is down these are also counted as unknown. */
        online: all.filter((r) => r.online).length,
        unknown: link.delivering ? 0 : all.length,
      },
    };
  };

  return async (req: Request): Promise<Response> => {
    try {
      const url = new URL(req.url);
      const parts = url.pathname.split("/").filter((p) => p !== "").map(decodeURIComponent);
      if (url.pathname === "/healthz") {
        methods(req, ["GET", "HEAD"]);
        const s = await stats();
        return json(s.mqtt.connected ? 200 : 503, {
          ok: s.mqtt.connected,
          version: ctx.version,
          ...s,
        });
      }
      if (parts[0] !== "api") throw new HttpError(404, `no such endpoint ${url.pathname}`);
      if (parts.length === 2 && parts[1] === "stats") {
        methods(req, ["GET", "HEAD"]);
        return json(200, await stats());
      }
      if (parts[1] === "robots") {
        if (parts.length === 2) {
          methods(req, ["GET", "HEAD"]);
          const robots = await fleet.registry.listRobots();
          return json(200, { robots: robots.map((r) => fleet.robotView(r)) });
        }
        if (parts.length === 3) {
          methods(req, ["GET", "HEAD"]);
          return json(200, fleet.robotView(await robotOr404(parts[2])));
        }
        if (parts.length === 4 && parts[3] === "tasks") {
          methods(req, ["GET", "HEAD", "POST"]);
          const robot = await robotOr404(parts[2]);
          if (req.method === "POST") {
            const body = parseTaskRequest(await readBody(req));
            const task = await fleet.createTask(robot.id, body);
            return json(201, { id: task.id, state: task.state }, {
              location: `/api/tasks/${task.id}`,
            });
          }
          return json(200, { tasks: (await fleet.registry.listTasks(robot.id)).map(taskView) });
        }
      }
      if (parts[1] === "tasks" && parts.length === 3) {
        methods(req, ["GET", "HEAD"]);
        const t = await fleet.registry.getTask(parts[2]);
        if (!t) throw new HttpError(404, `unknown task ${JSON.stringify(parts[2])}`);
        return json(200, taskView(t));
      }
      throw new HttpError(404, `no such endpoint ${url.pathname}`);
    } catch (err) {
      if (err instanceof HttpError) return json(err.status, { error: err.message }, err.headers);
      if (err instanceof NotFoundError) return json(404, { error: err.message });
      if (err instanceof URIError) return json(400, { error: "path: invalid percent-encoding" });
      return json(500, { error: `internal error: ${(err as Error).message}` });
    }
  };
}

export interface HttpApi {
  /** The address actually bound (port 0 resolves to a free port). */
  addr: { hostname: string; port: number };
  url: string;
  close(): Promise<void>;
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

export function serveHttpApi(
  ctx: ApiContext,
  opts: { hostname: string; port: number },
): HttpApi {
  const ac = new AbortController();
  const server = Deno.serve({
    hostname: opts.hostname,
    port: opts.port,
    signal: ac.signal,
    onListen: () => {},
  }, createHandler(ctx));
  const a = server.addr as Deno.NetAddr;
  const host = a.hostname.includes(":") ? `[${a.hostname}]` : a.hostname;
  return {
    addr: { hostname: a.hostname, port: a.port },
    url: `http://${host}:${a.port}`,
    async close() {
      ac.abort();
      await server.finished;
    },
  };
}
