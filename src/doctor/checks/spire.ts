/** spire-server and spire-agent: the guide's "SPIRE Server 启动失败" and "Agent 未连接" steps. */
import { dirname } from "node:path";
import { errorMessage } from "../../cli/errors.ts";
import {
  type Check,
  type CheckContext,
  fail,
  formatDuration,
  ok,
  rel,
  type TimeoutSpec,
  warn,
} from "../check.ts";
import { certFacts } from "../pki.ts";
import { files, fsHangHint, mutePeerHint, robotSvid, socketDirProblem, tail } from "./common.ts";

const START = "k8s4r devenv start";

const serverPort: Check = {
  id: "spire-server.port",
  group: "spire-server",
  title: "SPIRE server listens",
  timeout: {
    hint: (ctx) =>
      `reading /proc to find who listens on port ${ctx.layout.ports.spireServer} did not finish: the host is overloaded: uptime; ss -ltnp 'sport = :${ctx.layout.ports.spireServer}'`,
  },
  async run(ctx) {
    const port = ctx.layout.ports.spireServer;
    const owner = await ctx.net.listeningOwner(port);
    const log = rel(ctx, files(ctx).spireServerLog);
    if (!owner) {
      return fail(`nothing listens on port ${port}`, `${START}   # then, if it fails: cat ${log}`);
    }
    const where = `${owner.address}:${port}`;
    if (owner.pid === undefined) {
      return ok(`${where} is listening (owner not visible to this user)`);
    }
    if (owner.comm && owner.comm !== "spire-server") {
      return fail(
        `${where} is held by ${owner.comm} (pid ${owner.pid}), not spire-server`,
        `stop pid ${owner.pid} (ps -p ${owner.pid} -o args=), or move SPIRE: K8S4R_SPIRE_SERVER_PORT=<free port> ${START}`,
      );
    }
    return ok(`${where} held by ${owner.comm ?? "?"} (pid ${owner.pid})`);
  },
};

async function healthOf(ctx: CheckContext, socket: string, what: string, fix: string) {
  const st = await ctx.fs.stat(socket);
  if (!st) return fail(`${socket} does not exist`, fix);
  if (!st.isSocket) return fail(`${socket} is not a socket`, `rm ${socket} && ${START}`);
  let status: string;
  try {
    status = (await ctx.spire.health(socket, ctx.timeoutMs)).status;
  } catch (err) {
    return fail(`${what} does not answer on ${socket}: ${errorMessage(err)}`, fix);
  }
  if (status !== "SERVING") return fail(`${what} reports ${status}`, fix);
  return ok(`${what} is SERVING (grpc.health.v1 on ${rel(ctx, socket)})`);
}

const serverHealth: Check = {
  id: "spire-server.health",
  group: "spire-server",
  title: "SPIRE server healthy",
  timeout: {
    hint: (ctx) => mutePeerHint("spire-server", ctx.layout.spireServerSocket, "spire-server"),
    peer: (ctx) => ({ name: "spire-server", unixSocket: ctx.layout.spireServerSocket }),
  },
  run(ctx) {
    const log = rel(ctx, files(ctx).spireServerLog);
    return healthOf(
      ctx,
      ctx.layout.spireServerSocket,
      "spire-server",
      `${START}   # or look at: tail -n 50 ${log}`,
    );
  },
};

/** logrus text: `time="2025-01-01T00:00:00Z" level=error msg="..."`, or JSON lines. */
export function logLevelAndTime(line: string): { level?: string; time?: number } {
  const level = /\blevel=("?)(\w+)\1/.exec(line)?.[2] ?? /"level":"(\w+)"/.exec(line)?.[1];
  const t = /\btime="([^"]+)"/.exec(line)?.[1] ?? /"time":"([^"]+)"/.exec(line)?.[1];
  const time = t ? Date.parse(t) : undefined;
  return { level: level?.toLowerCase(), time: Number.isFinite(time) ? time : undefined };
}

/** Errors in the last 10 minutes make the log check a warning. */
export const RECENT_MS = 10 * 60_000;

const serverLog: Check = {
  id: "spire-server.log",
  group: "spire-server",
  title: "SPIRE server log",
  timeout: { hint: (ctx) => fsHangHint(ctx, files(ctx).spireServerLog) },
  async run(ctx) {
    const path = files(ctx).spireServerLog;
    const lines = await tail(ctx, path, 400);
    if (lines === undefined) {
      return warn(`no log at ${rel(ctx, path)} (is the server started by devenv?)`, START);
    }
    const now = ctx.clock.now();
    const errors = lines.filter((l) =>
      ["error", "fatal", "panic"].includes(logLevelAndTime(l).level ?? "")
    );
    const recent = errors.filter((l) => {
      const t = logLevelAndTime(l).time;
      return t === undefined || now - t < RECENT_MS;
    });
    const shown = errors.slice(-5);
    if (recent.length) {
      return warn(
        `${recent.length} error line(s) in the last ${formatDuration(RECENT_MS)}: ${
          shortMsg(recent[recent.length - 1])
        }`,
        `less +G ${rel(ctx, path)}`,
        shown,
      );
    }
    return ok(
      errors.length
        ? `no recent errors (${errors.length} older)`
        : `no errors in the last ${lines.length} lines`,
      shown,
    );
  },
};

function shortMsg(line: string): string {
  const m = /\bmsg="((?:[^"\\]|\\.)*)"/.exec(line)?.[1] ??
    /"msg":"((?:[^"\\]|\\.)*)"/.exec(line)?.[1];
  const s = m ?? line;
  return s.length > 120 ? s.slice(0, 117) + "..." : s;
}

// --- agent ---------------------------------------------------------------------------------------

/** The robot's spire-agent serves both the health check and the Workload API on its socket. */
export const agentTimeout: TimeoutSpec = {
  hint: (ctx) => mutePeerHint("spire-agent", ctx.robot.agentSocket, "spire-agent"),
  peer: (ctx) => ({ name: "spire-agent", unixSocket: ctx.robot.agentSocket }),
};

const agentSocket: Check = {
  id: "spire-agent.socket",
  group: "spire-agent",
  title: "Workload API socket",
  timeout: { hint: (ctx) => fsHangHint(ctx, ctx.robot.agentSocket) },
  async run(ctx) {
    const sock = ctx.robot.agentSocket;
    const dir = dirname(sock);
    const st = await ctx.fs.stat(sock);
    const log = rel(ctx, ctx.robot.logFile);
    if (!st) {
      return fail(
        `${sock} does not exist`,
        `${START}   # starts ${ctx.options.robotId}'s agent; log: ${log}`,
      );
    }
    if (!st.isSocket) return fail(`${sock} exists but is not a socket`, `rm ${sock} && ${START}`);
    // The agent's own rule: owned by this user or root, writable by nobody else, all the way up.
    const bad = await socketDirProblem(ctx, sock);
    if (bad) return fail(bad.detail, bad.hint);
    const d = await ctx.fs.stat(dir);
    return ok(
      `${sock} is a socket (dir mode ${d ? d.mode.toString(8).padStart(3, "0") : "?"}, uid ${
        d?.uid ?? "?"
      }: only its owner can replace it)`,
    );
  },
};

const agentHealth: Check = {
  id: "spire-agent.health",
  group: "spire-agent",
  title: "SPIRE agent healthy",
  timeout: agentTimeout,
  dependsOn: ["spire-agent.socket"],
  run(ctx) {
    return healthOf(
      ctx,
      ctx.robot.agentSocket,
      "spire-agent",
      `grep -i error ${rel(ctx, ctx.robot.logFile)} | tail; then: ${START}`,
    );
  },
};

const joinToken: Check = {
  id: "spire-agent.join-token",
  group: "spire-agent",
  title: "join token (first attestation)",
  timeout: { hint: (ctx) => fsHangHint(ctx, ctx.robot.agentDataDir) },
  async run(ctx) {
    if (await ctx.spire.isAttested(ctx.robot.agentDataDir)) {
      return ok(`agent has attested before (${rel(ctx, ctx.robot.agentDataDir)}); no token needed`);
    }
    // Never print a token: say only where it is and how long it is.
    const env = ctx.env["SPIRE_JOIN_TOKEN"];
    if (env) return ok(`SPIRE_JOIN_TOKEN is set (${env.length} chars)`);
    const tf = ctx.robot.joinTokenFile;
    const st = await ctx.fs.stat(tf);
    if (st?.isFile) {
      if (st.mode & 0o077) {
        return fail(
          `${rel(ctx, tf)} is mode ${st.mode.toString(8)}: a token file must be private`,
          `chmod 600 ${tf}`,
        );
      }
      return ok(`token file ${rel(ctx, tf)} (0600)`);
    }
    return fail(
      `agent never attested and no join token: neither SPIRE_JOIN_TOKEN nor ${rel(ctx, tf)}`,
      `${START}   # or: spire-server token generate -spiffeID ${ctx.robot.nodeSpiffeId} -socketPath ${ctx.layout.spireServerSocket}`,
    );
  },
};

const agentSvid: Check = {
  id: "spire-agent.svid",
  group: "spire-agent",
  title: "X.509 SVID from the Workload API",
  timeout: agentTimeout,
  dependsOn: ["spire-agent.socket"],
  async run(ctx) {
    const sock = ctx.robot.agentSocket;
    let svid;
    try {
      svid = await robotSvid(ctx);
    } catch (err) {
      const msg = errorMessage(err);
      const entry = /PermissionDenied|no SVID|no identity/i.test(msg);
      return fail(
        `Workload API on ${sock}: ${msg}`,
        entry
          ? `register the workload: spire-server entry show -spiffeID ${ctx.robot.spiffeId} -socketPath ${ctx.layout.spireServerSocket} (devenv start creates it)`
          : `spire-agent api fetch x509 -socketPath ${sock}   # to see the agent's own answer`,
      );
    }
    const v = ctx.spire.verifyChain(svid.chain, svid.bundle, ctx.clock.now());
    if (!v.ok) {
      return fail(
        `SVID ${svid.spiffeId} does not verify against the bundle: ${v.error}`,
        `restart the agent: k8s4r devenv stop && ${START}`,
      );
    }
    const f = certFacts(svid.chain[0]);
    const ttl = f.notAfter - f.notBefore;
    const left = f.notAfter - ctx.clock.now();
    const detail = `${svid.spiffeId}, expires in ${formatDuration(left)} (TTL ${
      formatDuration(ttl)
    })`;
    const info = [
      `not after ${new Date(f.notAfter).toISOString()}`,
      `chain: ${svid.chain.length} cert(s), bundle: ${svid.bundle.length} CA(s)`,
    ];
    if (left < ttl * 0.1) {
      return warn(
        `${detail}: below 10% of its lifetime, the agent should have rotated it at 50%`,
        `grep -i -E 'rotat|error' ${
          rel(ctx, ctx.robot.logFile)
        } | tail   # is the agent still connected to the server?`,
        info,
      );
    }
    return ok(detail, info);
  },
};

export const spireServerChecks: Check[] = [serverPort, serverHealth, serverLog];
export const spireAgentChecks: Check[] = [agentSocket, agentHealth, joinToken, agentSvid];
