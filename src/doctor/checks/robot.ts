/**
 * The doctor on a robot host (`k8s4r doctor --robot`, or `--data-dir DIR`, or /etc/k8s4r): the
 * robot's own files and what they point at.
 *
 * - enrollment: agent.yaml judged by the agent's own loader, the enrollment record, the data dir
 *   (owner, modes of the secrets), the join token (unused, used, expired);
 * - reachability: the SPIRE server and the broker from the robot's config, TCP first, then the
 *   TLS handshake (gRPC's ALPN for SPIRE; the MQTT probe of src/mqtt/probe.ts for the broker,
 *   with the robot's SVID when its agent serves one);
 * - identity: the clock against the certificates' validity, the agent SVID's expiry against the
 *   re-attestation rules (join token: locked out once expired; x509pop: re-attests), the x509pop
 *   certificate and key, the running agent.
 */
import { Buffer } from "node:buffer";
import { isIP } from "node:net";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { errorMessage } from "../../cli/errors.ts";
import { type AgentConfig, agentConfigFromText } from "../../agent/config.ts";
import {
  commonName,
  type Enrollment,
  lockedOutMessage,
  parseEnrollment,
  reattestsMessage,
  reenrollHint,
  robotAddCommand,
} from "../../fleet/enrollment.ts";
import { formatHostPort } from "../../fleet/addresses.ts";
import { AGENT_UNIT_PATH, PRODUCTION_CONFIG_DIR } from "../../fleet/paths.ts";
import { DEFAULT_TASK_USER } from "../../agent/task_user.ts";
import { robotTaskChecks } from "./tasks.ts";
import { samePublicKey } from "../../spiffe/csr.ts";
import { judgeAgentSvid } from "../../spire/agent_state.ts";
import {
  CALL_GRACE_MS,
  type Check,
  type CheckContext,
  type CheckResult,
  type DoctorContext,
  fail,
  formatDuration,
  ok,
  skip,
  type TimeoutSpec,
  warn,
} from "../check.ts";
import { certFacts, derToPem, pemCertificates } from "../pki.ts";
import { socketDirProblem, svidPem } from "./common.ts";

/** A clock this far behind a certificate's notBefore is "behind" (SPIRE backdates by 10 s). */
const CLOCK_TOLERANCE_MS = 60_000;

interface Robot {
  config: AgentConfig;
  /** The enrollment record, when there is one. */
  record?: Enrollment;
  recordError?: string;
}

function paths(ctx: DoctorContext) {
  if (!ctx.robotHost) throw new Error("not a robot host context");
  return ctx.robotHost.paths;
}

/** `--data-dir DIR` for commands, unless the robot uses the production directories. */
function dataDirArg(ctx: DoctorContext): string | undefined {
  const p = paths(ctx);
  return p.configDir === PRODUCTION_CONFIG_DIR ? undefined : p.dataDir;
}

function reenroll(
  ctx: DoctorContext,
  robotId: string | undefined,
  type?: "join_token" | "x509pop",
) {
  return robotId
    ? reenrollHint(robotId, type, dataDirArg(ctx))
    : `on the control host run: ${
      robotAddCommand(undefined, type)
    }; then on this robot: k8s4r agent --enroll ROBOT_ID.enroll.json${
      dataDirArg(ctx) ? ` --data-dir ${dataDirArg(ctx)}` : ""
    }`;
}

/** The loaded robot, for the (synchronous) timeout hints: by the run's robot-host context. */
const loaded = new WeakMap<object, Robot>();

/** agent.yaml (the agent's loader) and enrollment.json, read once per run. */
function loadRobot(ctx: CheckContext): Promise<Robot> {
  return ctx.memo("robot", async () => {
    const p = paths(ctx);
    let text: string;
    try {
      text = await ctx.fs.readTextFile(p.agentConfig);
    } catch {
      throw new Error(`not enrolled: ${p.agentConfig} does not exist`);
    }
    const { config } = agentConfigFromText(text, {
      cwd: p.configDir,
      env: ctx.env,
      flags: { dataDir: p.dataDir },
      file: p.agentConfig,
      display: p.agentConfig,
    });
    const robot: Robot = { config };
    try {
      const rec = await ctx.fs.readTextFile(p.enrollmentRecord);
      robot.record = parseEnrollment(rec, p.enrollmentRecord, { record: true });
    } catch (err) {
      robot.recordError = errorMessage(err);
    }
    loaded.set(ctx.robotHost!, robot);
    return robot;
  });
}

const fsTimeout = (what: (ctx: DoctorContext) => string): TimeoutSpec => ({
  hint: (ctx) =>
    `reading ${
      what(ctx)
    } did not finish: the file system does not answer (a failing SD card or disk): ls -l ${
      what(ctx)
    }; dmesg | tail`,
});

const config: Check = {
  id: "enrollment.config",
  group: "enrollment",
  title: "agent config (agent.yaml)",
  timeout: fsTimeout((ctx) => paths(ctx).agentConfig),
  async run(ctx) {
    let r: Robot;
    try {
      r = await loadRobot(ctx);
    } catch (err) {
      const msg = errorMessage(err);
      return fail(
        msg,
        /^not enrolled/.test(msg)
          ? reenroll(ctx, undefined)
          : `fix the file, or enroll again: ${reenroll(ctx, undefined)}`,
      );
    }
    const c = r.config;
    return ok(
      `${c.robotId}: ${c.spire.nodeAttestor.type}, SPIRE ${
        formatHostPort(c.spire.serverHost, c.spire.serverPort)
      }, broker ${c.mqtt.brokerUrl} (${ctx.robotHost!.reason})`,
      [`config ${c.file ?? paths(ctx).agentConfig}`, `data dir ${c.spire.dataDir}`],
    );
  },
};

const record: Check = {
  id: "enrollment.record",
  group: "enrollment",
  title: "enrollment record (enrollment.json)",
  dependsOn: ["enrollment.config"],
  timeout: fsTimeout((ctx) => paths(ctx).enrollmentRecord),
  async run(ctx) {
    const r = await loadRobot(ctx);
    if (!r.record) {
      return warn(
        `no usable ${paths(ctx).enrollmentRecord}: ${r.recordError}`,
        `enroll with the control host's file, so the doctor can check its expiry: ${
          reenroll(ctx, r.config.robotId, r.config.spire.nodeAttestor.type)
        }`,
      );
    }
    const e = r.record;
    if (e.robotId !== r.config.robotId) {
      return fail(
        `the enrollment is for ${e.robotId}, agent.yaml says ${r.config.robotId}`,
        reenroll(ctx, e.robotId, e.attestation.type),
      );
    }
    return ok(
      `${e.robotId} enrolled by ${e.attestation.type}, file written ${e.createdAt.toISOString()}`,
    );
  },
};

/** Who may read or write what in the data dir. */
const dataDir: Check = {
  id: "enrollment.data-dir",
  group: "enrollment",
  title: "data dir: owner and modes",
  dependsOn: ["enrollment.config"],
  timeout: fsTimeout((ctx) => paths(ctx).dataDir),
  async run(ctx) {
    const r = await loadRobot(ctx);
    const p = paths(ctx);
    const dir = r.config.spire.dataDir;
    const st = await ctx.fs.stat(dir);
    if (!st?.isDirectory) {
      return fail(`${dir} does not exist`, reenroll(ctx, r.config.robotId));
    }
    const problems: string[] = [];
    const fixes: string[] = [];
    const mine = (uid: number | undefined) => uid === undefined || uid === ctx.uid;
    if (!mine(st.uid)) {
      problems.push(`${dir} belongs to uid ${st.uid}, not ${ctx.uid} (who runs the agent)`);
      fixes.push(`chown -R ${ctx.uid} ${dir}`);
    }
    if (st.mode & 0o077) {
      problems.push(`${dir} is mode ${st.mode.toString(8)}, expected 0700`);
      fixes.push(`chmod 700 ${dir}`);
    }
    const secrets = [
      p.joinTokenFile,
      p.x509popKey,
      p.enrollmentRecord,
      `${dir}/keys.json`,
      `${dir}/agent-data.json`,
    ];
    for (const f of secrets) {
      const s = await ctx.fs.stat(f);
      if (!s) continue;
      if (s.mode & 0o077) {
        problems.push(`${f} is mode ${s.mode.toString(8)}, expected 0600`);
        fixes.push(`chmod 600 ${f}`);
      }
      if (!mine(s.uid)) {
        problems.push(`${f} belongs to uid ${s.uid}`);
        fixes.push(`chown ${ctx.uid} ${f}`);
      }
    }
    // The socket directory (made by the service manager when the agent runs), by the rule the
    // agent applies itself.
    if (await ctx.fs.stat(p.runtimeDir)) {
      const bad = await socketDirProblem(ctx, p.socketPath);
      if (bad) {
        problems.push(bad.detail);
        fixes.push(bad.hint);
      }
    }
    if (problems.length) return fail(problems.join("; "), fixes.join("; "));
    return ok(`${dir} (0700, uid ${st.uid ?? "?"}), secrets 0600`);
  },
};

const joinToken: Check = {
  id: "enrollment.join-token",
  group: "enrollment",
  title: "join token",
  dependsOn: ["enrollment.config"],
  timeout: fsTimeout((ctx) => paths(ctx).joinTokenFile),
  async run(ctx) {
    const r = await loadRobot(ctx);
    const c = r.config;
    if (c.spire.nodeAttestor.type !== "join_token") {
      return skip(`${c.spire.nodeAttestor.type} robot: no join token`);
    }
    const now = ctx.clock.now();
    const state = await ctx.spire.agentData(c.spire.dataDir).catch(() => undefined);
    const tf = c.spire.joinTokenFile;
    const st = tf ? await ctx.fs.stat(tf) : undefined;
    if (state?.attested) {
      return ok(
        `used by the first attestation: a join token works once${
          st ? `; ${tf} can be deleted` : ""
        }`,
      );
    }
    if (!st) {
      return fail(
        `the agent never attested and has no join token (${tf ?? "spire.joinTokenFile unset"})`,
        reenroll(ctx, c.robotId, "join_token"),
      );
    }
    if (st.mode & 0o077) {
      return fail(
        `${tf} is mode ${st.mode.toString(8)}: a token file must be 0600`,
        `chmod 600 ${tf}`,
      );
    }
    const exp = r.record?.attestation.expiresAt;
    if (exp && exp.getTime() <= now) {
      return fail(
        `the join token expired at ${exp.toISOString()} (${
          formatDuration(now - exp.getTime())
        } ago) before the agent attested`,
        reenroll(ctx, c.robotId, "join_token"),
      );
    }
    return ok(
      `unused${exp ? `, expires in ${formatDuration(exp.getTime() - now)}` : ""} (${tf}, 0600)`,
    );
  },
};

// --- reachability ------------------------------------------------------------------------------

function dropHint(host: string, port: number): string {
  return `TCP connect to ${formatHostPort(host, port)} got no answer: packets are dropped ` +
    `(cable, route, firewall): ip route get ${host}; ping -c 3 ${host}`;
}

function tcpCheck(
  id: string,
  title: string,
  target: (c: AgentConfig) => { host: string; port: number; what: string },
): Check {
  return {
    id,
    group: "reachability",
    title,
    dependsOn: ["enrollment.config"],
    timeout: {
      hint: (ctx) => {
        const r = ctx.robotHost && loaded.get(ctx.robotHost);
        if (!r) {
          return "the TCP connect did not finish: packets are dropped (cable, route, firewall): ip route";
        }
        const t = target(r.config);
        return dropHint(t.host, t.port);
      },
    },
    async run(ctx) {
      const t = target((await loadRobot(ctx)).config);
      const where = formatHostPort(t.host, t.port);
      // A dropped SYN is this check's answer (with the address), not the runner's timeout.
      const budget = Math.max(100, ctx.timeoutMs - CALL_GRACE_MS - 300);
      const r = await ctx.net.tcpConnect(t.host, t.port, budget);
      if (r.ok) return ok(`${t.what} at ${where} accepts TCP connections`);
      if (r.code === "ECONNREFUSED") {
        return fail(
          `${t.what} at ${where}: connection refused (the host answers, nothing listens on port ${t.port})`,
          `on the control host, ${t.what} must listen on ${t.host}, not only 127.0.0.1: ss -ltnp 'sport = :${t.port}'`,
        );
      }
      if (r.code === "ETIMEDOUT") {
        return fail(`${t.what} at ${where}: ${r.error}`, dropHint(t.host, t.port));
      }
      return fail(
        `${t.what} at ${where}: ${r.code ?? "error"}: ${r.error}`,
        r.code === "ENOTFOUND" || r.code === "EAI_AGAIN"
          ? `the name ${t.host} does not resolve here: getent hosts ${t.host}; or enroll with an address`
          : `ip route get ${t.host}; ping -c 3 ${t.host}`,
      );
    },
  };
}

const spireTcp = tcpCheck(
  "reachability.spire-server-tcp",
  "SPIRE server reachable (TCP)",
  (c) => ({ host: c.spire.serverHost, port: c.spire.serverPort, what: "the SPIRE server" }),
);
const brokerTcp = tcpCheck(
  "reachability.broker-tcp",
  "broker reachable (TCP)",
  (c) => ({ host: c.mqtt.host, port: c.mqtt.port, what: "the broker" }),
);

async function trustBundle(ctx: CheckContext, c: AgentConfig): Promise<string> {
  return await ctx.fs.readTextFile(c.spire.trustBundlePath);
}

/** A certificate-time problem as the clock's fault, in words. */
function timeProblem(code: string | undefined): string | undefined {
  if (code === "CERT_NOT_YET_VALID") return "not yet valid: this host's clock is behind";
  if (code === "CERT_HAS_EXPIRED") return "expired (or this host's clock is ahead)";
  return undefined;
}

const spireTls: Check = {
  id: "reachability.spire-server-tls",
  group: "reachability",
  title: "SPIRE server TLS handshake",
  dependsOn: ["reachability.spire-server-tcp"],
  timeout: {
    hint: () =>
      "the SPIRE server accepted TCP but never finished the TLS handshake: something else holds the port, or the link drops large packets (MTU): openssl s_client -connect HOST:PORT",
  },
  async run(ctx) {
    const c = (await loadRobot(ctx)).config;
    const where = formatHostPort(c.spire.serverHost, c.spire.serverPort);
    const ca = await trustBundle(ctx, c).catch(() => "");
    if (!ca) {
      return fail(
        `cannot read the trust bundle ${c.spire.trustBundlePath}`,
        reenroll(ctx, c.robotId),
      );
    }
    const r = await ctx.net.tlsHandshake({
      host: c.spire.serverHost,
      port: c.spire.serverPort,
      ca,
      timeoutMs: ctx.timeoutMs,
    });
    if (!r.handshake) {
      return fail(
        `${where}: no TLS handshake: ${r.error ?? r.code ?? "closed"}`,
        `is ${where} the SPIRE server? openssl s_client -connect ${where} -alpn h2`,
      );
    }
    const want = `spiffe://${c.spire.trustDomain}/spire/server`;
    const leaf = r.peerChain[0] ? certFacts(r.peerChain[0]) : undefined;
    if (!r.authorized) {
      const t = timeProblem(r.authorizationError);
      return fail(
        `${where}: the server's certificate does not verify against ${c.spire.trustBundlePath}: ${
          t ?? r.authorizationError
        }`,
        t?.includes("behind")
          ? CLOCK_HINT
          : `the trust bundle is not this server's (another trust domain, or SPIRE rotated to a CA the robot never saw): ${
            reenroll(ctx, c.robotId, c.spire.nodeAttestor.type)
          }`,
      );
    }
    if (!leaf?.uris.includes(want)) {
      return fail(
        `${where} presented ${leaf?.uris.join(", ") || "no SPIFFE ID"}, expected ${want}`,
        `spire.serverAddr points at another server: check it in ${paths(ctx).agentConfig}`,
      );
    }
    return ok(`${where}: TLS verified, ${want}`);
  },
};

/** The robot's SVID from its agent, when the agent serves; undefined otherwise. */
function robotSvidIfAny(ctx: CheckContext) {
  return ctx.memo("robot-svid", async () => {
    const c = (await loadRobot(ctx)).config;
    try {
      const svids = await ctx.spire.fetchX509Svids(c.spire.socketPath, ctx.timeoutMs);
      return svids.find((s) => s.spiffeId === c.spiffeId);
    } catch {
      return undefined;
    }
  });
}

const brokerTls: Check = {
  id: "reachability.broker-tls",
  group: "reachability",
  title: "broker TLS handshake (and MQTT login with the robot's SVID)",
  dependsOn: ["reachability.broker-tcp"],
  timeout: {
    hint: () =>
      "the broker accepted TCP but never finished the TLS handshake or the MQTT CONNECT: it is overloaded or hung (on the control host: k8s4r doctor --only broker)",
  },
  async run(ctx) {
    const c = (await loadRobot(ctx)).config;
    const where = formatHostPort(c.mqtt.host, c.mqtt.port);
    const ca = await trustBundle(ctx, c).catch(() => "");
    if (!ca) {
      return fail(
        `cannot read the trust bundle ${c.spire.trustBundlePath}`,
        reenroll(ctx, c.robotId),
      );
    }
    const svid = await robotSvidIfAny(ctx);
    const pem = svid ? svidPem(svid) : undefined;
    // Identify-only: the broker makes the certificate's CN (the robot id) the client id, so a
    // normal CONNECT with the robot's SVID would take the running agent's session over.
    const r = await ctx.net.mqttProbe({
      host: c.mqtt.host,
      port: c.mqtt.port,
      clientId: `k8s4r-doctor-${c.robotId}-${ctx.clock.now().toString(36)}`,
      identifyOnly: pem !== undefined,
      timeoutMs: ctx.timeoutMs,
      tls: {
        ca: pem ? pem.ca : ca,
        cert: pem?.cert,
        key: pem?.key,
        // SNI cannot be an IP address; the broker is judged by its SPIFFE ID below anyway.
        servername: isIP(c.mqtt.host) ? "localhost" : c.mqtt.host,
        verify: false,
      },
    });
    const tlsr = r.tls;
    if (!tlsr?.handshake && !tlsr?.peerChain.length) {
      return fail(
        `${where}: no TLS handshake: ${r.detail}`,
        `is ${where} the broker's mTLS listener? openssl s_client -connect ${where}`,
      );
    }
    const leaf = tlsr.peerChain[0] ? certFacts(tlsr.peerChain[0]) : undefined;
    if (!tlsr.authorized) {
      const t = timeProblem(tlsr.authorizationError);
      return fail(
        `${where}: the broker's certificate does not verify against the trust bundle: ${
          t ?? tlsr.authorizationError
        }`,
        t?.includes("behind") ? CLOCK_HINT : reenroll(ctx, c.robotId, c.spire.nodeAttestor.type),
      );
    }
    if (!leaf?.uris.includes(c.mqtt.brokerSpiffeId)) {
      return fail(
        `${where} presented ${
          leaf?.uris.join(", ") || "no SPIFFE ID"
        }, expected ${c.mqtt.brokerSpiffeId}`,
        `mqtt.brokerUrl points at another broker: check it in ${paths(ctx).agentConfig}`,
      );
    }
    if (!svid) {
      return ok(
        `${where}: TLS verified, ${c.mqtt.brokerSpiffeId} (no MQTT login tried: the robot's agent serves no SVID)`,
      );
    }
    if (r.ok) {
      return ok(
        `${where}: TLS verified, ${c.spiffeId} identified by the broker (CONNACK 0x8c to an identify-only CONNECT: the agent's session is not touched)`,
      );
    }
    return fail(
      `${where}: TLS verified, but the broker refused ${c.spiffeId}: ${r.detail}`,
      `on the control host: is ${c.robotId} registered with -dns ${c.robotId} (the CN rule)? k8s4r doctor --only broker`,
    );
  },
};

// --- identity -----------------------------------------------------------------------------------

const CLOCK_HINT =
  "set the clock: timedatectl set-ntp true (or chronyc makestep; ntpdate POOL); a board without a real-time clock needs NTP before k8s4r-agent starts (its unit waits for time-sync.target)";

/** "3 h", "2 h 59 min", "12 min", "56 years". */
export function formatSkew(ms: number): string {
  const min = Math.round(ms / 60_000);
  if (min < 1) return `${Math.round(ms / 1000)} s`;
  if (min < 60) return `${min} min`;
  const days = ms / 86_400_000;
  if (days >= 730) return `${Math.floor(days / 365.25)} years`;
  if (days >= 2) return `${Math.floor(days)} days`;
  const h = Math.floor(min / 60);
  return min % 60 ? `${h} h ${min % 60} min` : `${h} h`;
}

/** Certificates and times the robot holds, each a lower bound of "now". */
async function evidence(ctx: CheckContext, r: Robot) {
  const c = r.config;
  const items: { what: string; notBefore: number; notAfter?: number }[] = [];
  const bundle = await trustBundle(ctx, c).catch(() => "");
  try {
    for (const der of pemCertificates(bundle)) {
      const f = certFacts(der);
      items.push({ what: "the trust bundle's CA", notBefore: f.notBefore, notAfter: f.notAfter });
    }
  } catch { /* judged elsewhere */ }
  const state = await ctx.spire.agentData(c.spire.dataDir).catch(() => undefined);
  if (state?.svid) {
    items.push({
      what: "the agent SVID",
      notBefore: state.svid.notBefore.getTime(),
      notAfter: state.svid.notAfter.getTime(),
    });
  }
  if (c.spire.nodeAttestor.type === "x509pop") {
    try {
      const der =
        pemCertificates(await ctx.fs.readTextFile(c.spire.nodeAttestor.certificatePath))[0];
      const f = certFacts(der);
      items.push({ what: "the x509pop certificate", notBefore: f.notBefore, notAfter: f.notAfter });
    } catch { /* judged by identity.x509pop */ }
  }
  if (r.record) {
    items.push({
      what: "the enrollment file's createdAt",
      notBefore: r.record.createdAt.getTime(),
    });
  }
  return { items, state };
}

const clock: Check = {
  id: "identity.clock",
  group: "identity",
  title: "clock against the certificates",
  dependsOn: ["enrollment.config"],
  timeout: fsTimeout((ctx) => paths(ctx).dataDir),
  async run(ctx) {
    const r = await loadRobot(ctx);
    const now = ctx.clock.now();
    const { items } = await evidence(ctx, r);
    if (!items.length) return skip("no certificate to compare the clock with");
    const latest = items.reduce((a, b) => (b.notBefore > a.notBefore ? b : a));
    const behind = latest.notBefore - now;
    if (behind > CLOCK_TOLERANCE_MS) {
      return fail(
        `SVIDs are not yet valid: the clock is ${formatSkew(behind)} behind (this host says ${
          new Date(now).toISOString()
        }, ${latest.what} dates from ${new Date(latest.notBefore).toISOString()})`,
        CLOCK_HINT,
      );
    }
    const cas = items.filter((i) => i.what === "the trust bundle's CA" && i.notAfter);
    if (cas.length && cas.every((i) => i.notAfter! < now)) {
      return fail(
        `every CA of the trust bundle has expired (last at ${
          new Date(Math.max(...cas.map((i) => i.notAfter!))).toISOString()
        }): the clock is ahead, or the bundle is stale`,
        `check the time (date -u; timedatectl), then: ${
          reenroll(ctx, r.config.robotId, r.config.spire.nodeAttestor.type)
        }`,
      );
    }
    return ok(
      `${
        new Date(now).toISOString()
      } is within the validity of ${items.length} certificate(s) and times`,
    );
  },
};

const agentSvid: Check = {
  id: "identity.agent-svid",
  group: "identity",
  title: "agent SVID and re-attestation",
  dependsOn: ["enrollment.config"],
  timeout: fsTimeout((ctx) => `${paths(ctx).dataDir}/agent-data.json`),
  async run(ctx) {
    const r = await loadRobot(ctx);
    const c = r.config;
    const now = ctx.clock.now();
    const type = c.spire.nodeAttestor.type;
    let state;
    try {
      state = await ctx.spire.agentData(c.spire.dataDir);
    } catch (err) {
      return fail(
        `${c.spire.dataDir}/agent-data.json is damaged: ${errorMessage(err)}`,
        type === "x509pop"
          ? `remove it; x509pop attests again: rm ${c.spire.dataDir}/agent-data.json`
          : reenroll(ctx, c.robotId, type),
      );
    }
    const v = judgeAgentSvid(state, now, type);
    switch (v.kind) {
      case "none":
        return ok(`not attested yet: the agent attests with its ${type} on its first start`);
      case "not-yet-valid":
        return fail(
          `SVIDs are not yet valid: the clock is ${
            formatSkew(v.behindMs)
          } behind (the agent SVID dates from ${v.notBefore.toISOString()})`,
          CLOCK_HINT,
        );
      case "expired":
        return v.reattestable
          ? ok(reattestsMessage(c.robotId, v.notAfter, now))
          : fail(lockedOutMessage(c.robotId, v.notAfter, now), reenroll(ctx, c.robotId, type));
      case "valid": {
        const left = formatDuration(v.notAfter.getTime() - now);
        return ok(
          `${
            state!.spiffeId ?? "agent SVID"
          } valid for ${left}; the running agent renews it at half its life. ${
            v.reattestable
              ? "If the robot is off longer, x509pop re-attests on its own."
              : `If the robot is off longer than ${left}, its used join token cannot bring it back: it must be enrolled again.`
          }`,
        );
      }
    }
  },
};

const x509pop: Check = {
  id: "identity.x509pop",
  group: "identity",
  title: "x509pop certificate and key",
  dependsOn: ["enrollment.config"],
  timeout: fsTimeout((ctx) => paths(ctx).x509popCert),
  async run(ctx) {
    const c = (await loadRobot(ctx)).config;
    const a = c.spire.nodeAttestor;
    if (a.type !== "x509pop") return skip(`${a.type} robot: no x509pop certificate`);
    const now = ctx.clock.now();
    const hint = reenroll(ctx, c.robotId, "x509pop");
    let cert: X509Certificate;
    try {
      cert = new X509Certificate(
        Buffer.from(pemCertificates(await ctx.fs.readTextFile(a.certificatePath))[0]),
      );
    } catch (err) {
      return fail(`${a.certificatePath}: ${errorMessage(err)}`, hint);
    }
    const ks = await ctx.fs.stat(a.privateKeyPath);
    if (!ks) {
      return fail(
        `no private key at ${a.privateKeyPath}: the certificate is useless without it`,
        `make a new key and CSR: k8s4r agent csr --robot-id ${c.robotId}${
          dataDirArg(ctx) ? ` --data-dir ${dataDirArg(ctx)}` : ""
        }; then ${hint}`,
      );
    }
    if (ks.mode & 0o077) {
      return fail(
        `${a.privateKeyPath} is mode ${ks.mode.toString(8)}: the key must be 0600`,
        `chmod 600 ${a.privateKeyPath}`,
      );
    }
    try {
      const key = createPrivateKey(await ctx.fs.readTextFile(a.privateKeyPath));
      if (!samePublicKey(cert.publicKey, key)) {
        return fail(`${a.certificatePath} is not for the key ${a.privateKeyPath}`, hint);
      }
    } catch (err) {
      return fail(`${a.privateKeyPath}: ${errorMessage(err)}`, hint);
    }
    const cn = commonName(cert);
    if (cn !== c.robotId) return fail(`the certificate is for CN=${cn}, not ${c.robotId}`, hint);
    const notAfter = Date.parse(cert.validTo);
    if (notAfter <= now) {
      return fail(
        `the x509pop certificate expired at ${new Date(notAfter).toISOString()}: SPIRE refuses it`,
        hint,
      );
    }
    return ok(`CN=${cn}, key 0600, valid for ${formatDuration(notAfter - now)}`, [
      `issuer ${cert.issuer.replace(/\n/g, ", ")}`,
      `certificate ${derToPem(new Uint8Array(cert.raw)).length} bytes PEM`,
    ]);
  },
};

const agentRunning: Check = {
  id: "identity.agent",
  group: "identity",
  title: "the robot's SPIRE agent serves",
  dependsOn: ["enrollment.config"],
  timeout: {
    hint: () =>
      "spire-agent accepted the connection but never answered: it is stopped or hung: systemctl status k8s4r-agent; ps -o pid,stat,args -C spire-agent",
  },
  async run(ctx): Promise<CheckResult> {
    const c = (await loadRobot(ctx)).config;
    const sock = c.spire.socketPath;
    const st = await ctx.fs.stat(sock);
    const start = dataDirArg(ctx)
      ? `k8s4r agent --data-dir ${dataDirArg(ctx)}`
      : "systemctl start k8s4r-agent";
    if (!st?.isSocket) return warn(`the agent is not running (no socket ${sock})`, start);
    try {
      const h = await ctx.spire.health(sock, ctx.timeoutMs);
      if (h.status !== "SERVING") return fail(`spire-agent reports ${h.status}`, start);
    } catch (err) {
      return warn(`nothing answers on ${sock}: ${errorMessage(err)}`, start);
    }
    const svid = await robotSvidIfAny(ctx);
    return svid ? ok(`SERVING on ${sock}; ${svid.spiffeId} issued`) : warn(
      `SERVING on ${sock}, but no SVID for ${c.spiffeId}`,
      `on the control host: is the workload entry there? spire-server entry show -spiffeID ${c.spiffeId}`,
    );
  },
};

const taskUser: Check = {
  id: "enrollment.task-user",
  group: "enrollment",
  title: "tasks never run as root",
  dependsOn: ["enrollment.config"],
  timeout: fsTimeout((ctx) => paths(ctx).agentConfig),
  async run(ctx): Promise<CheckResult> {
    const c = (await loadRobot(ctx)).config;
    const file = paths(ctx).agentConfig;
    if (c.tasks.allow.length === 0) return ok("tasks.allow is empty: no task runs");
    // The unit runs the agent as root; so does root running it by hand.
    const asRoot = ctx.uid === 0 || (await ctx.fs.stat(AGENT_UNIT_PATH)) !== undefined;
    if (c.tasks.user === undefined) {
      return asRoot
        ? fail(
          `${file}: tasks.allow is set and tasks.user is not: the agent (root) refuses to start`,
          `add "  user: ${DEFAULT_TASK_USER}" under tasks: in ${file} (as root: useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin --user-group ${DEFAULT_TASK_USER})`,
        )
        : warn(
          `${file}: tasks run as the agent's own uid ${ctx.uid}, which the robot's registration entry selects: a task can fetch its SVID`,
          `run the agent as root with tasks.user: ${DEFAULT_TASK_USER}`,
        );
    }
    return ok(
      `tasks run as ${c.tasks.user}, with no capability (tasks.allow: ${c.tasks.allow.join(", ")})`,
    );
  },
};

export const robotChecks: Check[] = [
  config,
  record,
  dataDir,
  joinToken,
  spireTcp,
  spireTls,
  brokerTcp,
  brokerTls,
  clock,
  agentSvid,
  x509pop,
  agentRunning,
  taskUser,
  ...robotTaskChecks,
];
