/** broker: the guide's "MQTT mTLS 连接失败" steps: plain login, mTLS (node and openssl), refusal. */
import { join } from "node:path";
import { errorMessage } from "../../cli/errors.ts";
import { brokerSpiffeId } from "../../fleet/mod.ts";
import {
  type Check,
  type CheckContext,
  type CheckResult,
  fail,
  formatDuration,
  ok,
  rel,
  warn,
} from "../check.ts";
import { CONNACK_CODES } from "../../mqtt/wire.ts";
import { certFacts } from "../pki.ts";
import { brokerHangHint, files, robotMtls, robotSvid, svidPem, tail } from "./common.ts";
import type { TimeoutSpec } from "../check.ts";
import { mosquittoConfPath, readMosquittoConf } from "./config.ts";

const RESTART = "k8s4r devenv stop && k8s4r devenv start";

const plainTimeout: TimeoutSpec = {
  hint: (ctx) => brokerHangHint(ctx, ctx.layout.ports.mqttPlain),
  peer: (ctx) => ({ name: "mosquitto", tcpPort: ctx.layout.ports.mqttPlain }),
};
const tlsTimeout: TimeoutSpec = {
  hint: (ctx) => brokerHangHint(ctx, ctx.layout.ports.mqttTls),
  peer: (ctx) => ({ name: "mosquitto", tcpPort: ctx.layout.ports.mqttTls }),
};

/** Where the broker logs: `log_dest file X` in the generated config, else devenv's log. */
async function brokerLogLines(ctx: CheckContext): Promise<string[]> {
  if (ctx.options.broker === "docker") return [];
  let path = files(ctx).mosquittoLog;
  try {
    const conf = await readMosquittoConf(ctx);
    const d = conf.global.get("log_dest")?.value;
    if (d?.startsWith("file ")) path = d.slice(5).trim();
  } catch { /* no config: use the default */ }
  const lines = await tail(ctx, path, 5);
  return lines ? [`last lines of ${rel(ctx, path)}:`, ...lines] : [];
}

function logHint(ctx: CheckContext): string {
  return ctx.options.broker === "docker"
    ? `docker logs --tail 50 ${ctx.options.container}`
    : `tail -n 50 ${rel(ctx, files(ctx).mosquittoLog)}`;
}

const plain: Check = {
  id: "broker.plain",
  group: "broker",
  title: `MQTT login on the plain listener`,
  timeout: plainTimeout,
  async run(ctx) {
    const port = ctx.layout.ports.mqttPlain;
    const credFile = ctx.layout.serverCredentialsFile;
    if (!(await ctx.fs.stat(credFile))) {
      return fail(
        `${rel(ctx, credFile)} does not exist`,
        `k8s4r devenv start   # writes the server's MQTT credentials`,
      );
    }
    let creds: { username?: unknown; password?: unknown };
    try {
      creds = JSON.parse(await ctx.fs.readTextFile(credFile));
    } catch (err) {
      return fail(
        `cannot read ${rel(ctx, credFile)}: ${errorMessage(err)}`,
        `k8s4r devenv start   # writes the server's MQTT credentials`,
      );
    }
    if (typeof creds?.username !== "string" || typeof creds?.password !== "string") {
      return fail(
        `${rel(ctx, credFile)}: expected {"username": string, "password": string}`,
        RESTART,
      );
    }
    const r = await ctx.net.mqttProbe({
      port,
      username: creds.username,
      password: creds.password,
      clientId: `k8s4r-doctor-${Date.now().toString(36)}`,
      timeoutMs: ctx.timeoutMs,
    });
    const code = r.returnCode;
    if (code === undefined) {
      return fail(r.detail, `${RESTART}   # then: ${logHint(ctx)}`, await brokerLogLines(ctx));
    }
    if (code !== 0) {
      return fail(
        `127.0.0.1:${port} refused ${creds.username}: CONNACK ${code} (${
          CONNACK_CODES[code] ?? "unknown"
        })`,
        `${RESTART}   # regenerates the password file and ${rel(ctx, credFile)} together`,
      );
    }
    return ok(`127.0.0.1:${port} accepted ${creds.username}`);
  },
};

const mtlsNative: Check = {
  id: "broker.mtls-native",
  group: "broker",
  title: "mTLS with the robot's SVID (node:tls)",
  timeout: tlsTimeout,
  dependsOn: ["spire-agent.svid"],
  async run(ctx) {
    const port = ctx.layout.ports.mqttTls;
    let r;
    try {
      r = await robotMtls(ctx);
    } catch (err) {
      return fail(
        `no SVID to connect with: ${errorMessage(err)}`,
        "k8s4r doctor --only spire-agent   # fix the agent first",
      );
    }
    if (!r.tls?.handshake) {
      return fail(
        `TLS handshake with 127.0.0.1:${port} failed: ${r.error ?? r.detail}`,
        `${logHint(ctx)}; then ${RESTART}`,
        await brokerLogLines(ctx),
      );
    }
    if (!r.tls.authorized) {
      return fail(
        `broker certificate not issued under SPIRE's bundle: ${r.tls.authorizationError}`,
        `${RESTART}   # renews the broker certificate from SPIRE`,
      );
    }
    if (r.returnCode === undefined) {
      return fail(
        `handshake done, but the broker dropped the connection before CONNACK: ${
          r.error ?? r.detail
        }`,
        `${logHint(ctx)}   # the broker refused the client certificate (CA bundle stale?)`,
        await brokerLogLines(ctx),
      );
    }
    if (!r.ok) {
      return fail(
        `broker refused the robot: ${r.detail}`,
        `${
          logHint(ctx)
        }   # use_identity_as_username needs a CN: the entry must have -dns ${ctx.options.robotId}`,
      );
    }
    return ok(
      `127.0.0.1:${port} took ${ctx.robot.spiffeId}'s certificate identity (CONNACK 0x8c to an identify-only CONNECT: the robot's own session is not touched)`,
    );
  },
};

const mtlsOpenssl: Check = {
  id: "broker.mtls-openssl",
  group: "broker",
  title: "mTLS with the robot's SVID (openssl s_client)",
  timeout: tlsTimeout,
  dependsOn: ["spire-agent.svid"],
  async run(ctx) {
    const port = ctx.layout.ports.mqttTls;
    let svid;
    try {
      svid = await robotSvid(ctx);
    } catch (err) {
      return fail(
        `no SVID to connect with: ${errorMessage(err)}`,
        "k8s4r doctor --only spire-agent   # fix the agent first",
      );
    }
    const pem = svidPem(svid);
    // Key material goes into a private dir that is deleted afterwards; argv holds only paths.
    const dir = await ctx.fs.makeTempDir();
    try {
      const p = (n: string) => join(dir, n);
      await ctx.fs.writeFile(p("svid.pem"), pem.cert, 0o600);
      await ctx.fs.writeFile(p("svid.key"), pem.key, 0o600);
      await ctx.fs.writeFile(p("bundle.pem"), pem.ca, 0o600);
      const args = [
        "s_client",
        "-connect",
        `127.0.0.1:${port}`,
        "-servername",
        "localhost",
        "-verify_hostname",
        "localhost",
        "-CAfile",
        p("bundle.pem"),
        "-cert",
        p("svid.pem"),
        "-key",
        p("svid.key"),
        "-verify_return_error",
        "-brief",
      ];
      const r = await ctx.runner.output("openssl", args, {
        stdin: "",
        check: false,
        timeoutMs: ctx.timeoutMs,
        signal: ctx.signal,
      });
      const out = `${r.stdout}\n${r.stderr}`;
      const verified = /Verification: OK/.test(out);
      const established = /CONNECTION ESTABLISHED/.test(out);
      const proto = /Protocol version: (\S+)/.exec(out)?.[1];
      if (!r.success || !established || !verified) {
        const why = out.split("\n").map((l) =>
          l.trim()
        ).filter((l) => /error|alert|refused|verify/i.test(l)).slice(-1)[0] ??
          `exit ${r.code}`;
        return fail(
          `openssl s_client to 127.0.0.1:${port} failed: ${why}`,
          `openssl s_client -connect 127.0.0.1:${port} -CAfile ${
            rel(ctx, ctx.layout.caBundleFile)
          } -cert svid.0.pem -key svid.0.key   # after: spire-agent api fetch x509 -socketPath ${ctx.robot.agentSocket} -write .`,
          out.split("\n").filter((l) => l.trim()).slice(-5),
        );
      }
      return ok(`openssl s_client: ${proto ?? "TLS"}, server verified against the SVID bundle`);
    } finally {
      await ctx.fs.removeAll(dir);
    }
  },
};

const noCert: Check = {
  id: "broker.no-cert",
  group: "broker",
  title: "a client without a certificate is refused",
  timeout: tlsTimeout,
  async run(ctx) {
    const port = ctx.layout.ports.mqttTls;
    const ca = await ctx.fs.readTextFile(ctx.layout.caBundleFile).catch(() => "");
    // verify: false: the question is whether the broker lets an anonymous client in, whatever
    // the state of the exported bundle (ca-bundle.* checks that).
    const r = await ctx.net.mqttProbe({
      port,
      clientId: `k8s4r-doctor-anon-${Date.now().toString(36)}`,
      timeoutMs: ctx.timeoutMs,
      tls: { ca, servername: "localhost", verify: false },
    });
    if (r.outcome === "connection-refused") {
      return fail(
        `nothing listens on 127.0.0.1:${port}`,
        `${RESTART}   # then: ${logHint(ctx)}`,
        await brokerLogLines(ctx),
      );
    }
    if (r.returnCode === 0) {
      return fail(
        `127.0.0.1:${port} let a client without a certificate in`,
        `set 'require_certificate true' and 'allow_anonymous false' on listener ${port} in ${
          rel(ctx, mosquittoConfPath(ctx))
        } (${RESTART} regenerates it)`,
      );
    }
    if (r.returnCode !== undefined) return ok(`refused with CONNACK ${r.returnCode}`);
    if (r.outcome === "tls-error" || r.outcome === "closed") {
      return ok(`refused: ${r.error ?? r.detail}`);
    }
    return fail(
      `127.0.0.1:${port} neither accepted nor refused a client without a certificate: ${r.detail}`,
      `${logHint(ctx)}   # is it mosquitto's TLS listener?`,
      await brokerLogLines(ctx),
    );
  },
};

const brokerCert: Check = {
  id: "broker.certificate",
  group: "broker",
  title: "broker certificate",
  timeout: tlsTimeout,
  dependsOn: ["broker.mtls-native"],
  async run(ctx): Promise<CheckResult> {
    const r = await robotMtls(ctx);
    const svid = await robotSvid(ctx);
    const chain = r.tls?.peerChain ?? [];
    if (!chain.length) return fail("the broker sent no certificate", RESTART);
    const f = certFacts(chain[0]);
    const want = brokerSpiffeId(ctx.layout.trustDomain);
    const fix = `${RESTART}   # renews the broker's SVID (entry ${want}, -dns localhost)`;
    if (!f.uris.includes(want)) {
      return fail(
        `broker certificate has SPIFFE ID ${f.uris.join(", ") || "(none)"}, expected ${want}`,
        fix,
      );
    }
    if (!f.dnsNames.includes("localhost")) {
      return fail(
        `broker certificate has DNS names ${f.dnsNames.join(", ") || "(none)"}, expected localhost`,
        fix,
      );
    }
    const v = ctx.spire.verifyChain(chain, svid.bundle, ctx.clock.now());
    if (!v.ok) return fail(`broker certificate is not issued under the bundle: ${v.error}`, fix);
    const ttl = f.notAfter - f.notBefore;
    const left = f.notAfter - ctx.clock.now();
    const detail = `${want}, DNS localhost, expires in ${formatDuration(left)} (TTL ${
      formatDuration(ttl)
    })`;
    if (left < ttl * 0.1) {
      return warn(
        `${detail}: below 10% of its lifetime`,
        `tail -n 20 ${rel(ctx, files(ctx).brokerIdentityLog)}   # is broker-identity renewing it?`,
      );
    }
    return ok(detail, [`not after ${new Date(f.notAfter).toISOString()}`]);
  },
};

export const brokerChecks: Check[] = [plain, mtlsNative, mtlsOpenssl, noCert, brokerCert];
