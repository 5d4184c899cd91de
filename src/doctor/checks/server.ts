/**
 * server: the k8s4r fleet server's HTTPS API answers and sees the robot online. Requests go as
 * the CLI's operator (its credentials, see `k8s4r operator creds`).
 */
import { errorMessage } from "../../cli/errors.ts";
import { type Check, fail, ok, rel } from "../check.ts";
import { files, mutePeerHint } from "./common.ts";
import type { TimeoutSpec } from "../check.ts";
import { defaultServerUrl } from "../../fleet/paths.ts";

/** The server's URL: `localhost`, the name its certificate carries (it listens on 127.0.0.1). */
function apiBase(ctx: { layout: { ports: { http: number } } }): string {
  return defaultServerUrl(ctx.layout.ports.http);
}

const serverTimeout: TimeoutSpec = {
  hint: (ctx) =>
    mutePeerHint("the k8s4r server", `127.0.0.1:${ctx.layout.ports.http}`, "deno,k8s4r"),
  peer: (ctx) => ({ name: "k8s4r server", tcpPort: ctx.layout.ports.http }),
};

const healthz: Check = {
  id: "server.healthz",
  group: "server",
  title: "fleet server /healthz",
  timeout: serverTimeout,
  async run(ctx) {
    const url = `${apiBase(ctx)}/healthz`;
    const log = rel(ctx, files(ctx).serverLog);
    let r;
    try {
      r = await ctx.net.httpGet(url, ctx.timeoutMs);
    } catch (err) {
      return fail(
        `GET ${url}: ${errorMessage(err)}`,
        (err as { hint?: string }).hint ?? `k8s4r devenv start   # then: tail -n 50 ${log}`,
      );
    }
    if (r.status !== 200) {
      let why = "";
      let registry = false;
      try {
        const b = JSON.parse(r.body);
        const problems: unknown = b?.problems;
        if (Array.isArray(problems) && problems.length) {
          why = `: ${problems.join("; ")}`;
          registry = problems.some((p) => String(p).startsWith("registry:"));
        } else if (b?.mqtt?.connected === false) why = ": not connected to the broker";
      } catch { /* not JSON */ }
      return fail(
        `GET ${url} answered ${r.status}${why}`,
        registry
          ? "the fleet server's registry does not answer: start its database (PostgreSQL: " +
            `\`k8s4r devenv status\`, then \`k8s4r devenv start\`); its log: tail -n 50 ${log}`
          : `tail -n 50 ${log}   # then: k8s4r doctor --only broker`,
      );
    }
    return ok(`GET ${url} answered 200`);
  },
};

const robotOnline: Check = {
  id: "server.robot",
  group: "server",
  title: "robot online",
  timeout: serverTimeout,
  dependsOn: ["server.healthz"],
  async run(ctx) {
    const id = ctx.options.robotId;
    const url = `${apiBase(ctx)}/api/robots/${encodeURIComponent(id)}`;
    const agentLog = rel(ctx, ctx.robot.logFile);
    let r;
    try {
      r = await ctx.net.httpGet(url, ctx.timeoutMs);
    } catch (err) {
      return fail(
        `GET ${url}: ${errorMessage(err)}`,
        (err as { hint?: string }).hint ?? "k8s4r devenv start",
      );
    }
    if (r.status === 401 || r.status === 403) {
      let why = "";
      try {
        why = `: ${JSON.parse(r.body).error}`;
      } catch { /* not JSON */ }
      return fail(
        `GET ${url} answered ${r.status}${why}`,
        "k8s4r operator login   # or, on the control host: k8s4r operator add admin --role operator",
      );
    }
    if (r.status === 404) {
      return fail(
        `${id} has never registered with the server`,
        `tail -n 50 ${agentLog}   # is ${id}'s agent running? k8s4r devenv start`,
      );
    }
    if (r.status !== 200) {
      return fail(
        `GET ${url} answered ${r.status}`,
        `tail -n 50 ${rel(ctx, files(ctx).serverLog)}`,
      );
    }
    let robot: { online?: unknown; lastSeen?: unknown; offlineReason?: unknown };
    try {
      robot = JSON.parse(r.body);
    } catch {
      return fail(
        `GET ${url}: the answer is not JSON`,
        `tail -n 50 ${rel(ctx, files(ctx).serverLog)}`,
      );
    }
    if (robot.online !== true) {
      const why = typeof robot.offlineReason === "string" && robot.offlineReason
        ? ` (${robot.offlineReason})`
        : "";
      return fail(
        `${id} is offline${why}, last seen ${
          typeof robot.lastSeen === "string" ? robot.lastSeen : "never"
        }`,
        `tail -n 50 ${agentLog}   # then: k8s4r doctor --only broker`,
      );
    }
    return ok(`${id} is online`);
  },
};

export const serverChecks: Check[] = [healthz, robotOnline];
