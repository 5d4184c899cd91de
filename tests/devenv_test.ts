/**
 * devenv end to end, with real SPIRE, real Mosquitto and the real CLI (`deno run -A main.ts
 * devenv ...`) in a temp project dir, on free ports, with Workload API sockets in a short temp
 * dir. One stack is shared by the steps, because bringing it up is the expensive part.
 */
import { listeningSockets } from "../src/doctor/proc_net.ts";
import assert from "node:assert/strict";
import { X509Certificate } from "node:crypto";
import * as tls from "node:tls";
import { fileURLToPath } from "node:url";
import { freeMonitoringPorts, freePorts } from "./helpers/ports.ts";
import { spireBinaries } from "./helpers/spire.ts";
import mqtt from "mqtt";
import {
  isRecordAlive,
  processStartTime,
  readPidFile,
  realRunner,
  waitFor,
} from "../src/process/mod.ts";
import { descendants } from "../src/devenv/stop.ts";
import { AGENT_DENO_RUN_FLAGS } from "../src/agent/runtime_flags.ts";
import { probeMqttTls } from "../src/devenv/probes.ts";
import { layoutEnv } from "../src/devenv/layout.ts";
import { SpireServerCli } from "../src/spire/server.ts";

const REPO = fileURLToPath(new URL("..", import.meta.url));
const MAIN = `${REPO}main.ts`;

interface Stack {
  dir: string;
  sockDir: string;
  env: Record<string, string>;
  ports: { spire: number; plain: number; tls: number; http: number };
}

async function cli(stack: Stack, ...args: string[]) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", MAIN, "devenv", ...args, "--project-dir", stack.dir],
    cwd: stack.dir,
    env: stack.env,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const d = new TextDecoder();
  return { code: out.code, stdout: d.decode(out.stdout), stderr: d.decode(out.stderr) };
}

async function mustRun(stack: Stack, ...args: string[]) {
  const r = await cli(stack, ...args);
  assert.equal(r.code, 0, `devenv ${args.join(" ")} failed:\n${r.stdout}\n${r.stderr}`);
  return r;
}

const PID_FILES = ["spire-server", "broker-identity", "mosquitto", "server", "agent"];

function pids(stack: Stack): Record<string, number> {
  const out: Record<string, number> = {};
  for (const n of PID_FILES) {
    const rec = readPidFile(`${stack.dir}/.dev-env/${n}.pid`);
    assert.ok(rec && isRecordAlive(rec), `${n} is not running`);
    out[n] = rec.pid;
  }
  return out;
}

/** Ports in LISTEN state, from /proc/net/tcp and tcp6. */
function listeningPorts(): Set<number> {
  return new Set(listeningSockets().map((s) => s.port));
}

function peerCert(port: number, ca: string, cert: string, key: string): Promise<X509Certificate> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: "127.0.0.1", port, ca, cert, key, servername: "localhost" });
    s.once("secureConnect", () => {
      const raw = s.getPeerX509Certificate();
      s.destroy();
      raw ? resolve(raw) : reject(new Error("no peer certificate"));
    });
    s.once("error", reject);
  });
}

async function fetchSvid(socket: string): Promise<{ cert: string; key: string; ca: string }> {
  const dir = await Deno.makeTempDir();
  try {
    const out = await new Deno.Command((await spireBinaries()).agent, {
      args: ["api", "fetch", "x509", "-socketPath", socket, "-write", dir],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    return {
      cert: await Deno.readTextFile(`${dir}/svid.0.pem`),
      key: await Deno.readTextFile(`${dir}/svid.0.key`),
      ca: await Deno.readTextFile(`${dir}/bundle.0.pem`),
    };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function connect(url: string, opts: mqtt.IClientOptions): Promise<mqtt.MqttClient> {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(url, { reconnectPeriod: 0, connectTimeout: 5000, ...opts });
    c.once("connect", () => resolve(c));
    c.once("error", (e) => {
      c.end(true);
      reject(e);
    });
  });
}

Deno.test({
  name: "devenv: start, status, identity, ACL, rotation, idempotence, restart, stop, clean",
  // mqtt.js keeps timers past end(); every process is stopped and checked below.
  sanitizeOps: false,
  sanitizeResources: false,
  async fn(t) {
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-devenv-" });
    const sockDir = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s" });
    await Deno.mkdir(`${dir}/config`, { recursive: true });
    for (const sub of ["spire", "agent"]) {
      await Deno.mkdir(`${dir}/config/${sub}`, { recursive: true });
      for (const e of Deno.readDirSync(`${REPO}config/${sub}`)) {
        await Deno.copyFile(`${REPO}config/${sub}/${e.name}`, `${dir}/config/${sub}/${e.name}`);
      }
    }
    const [spire, plain, tls, http] = freePorts(4);
    const ports = { spire, plain, tls, http };
    const stack: Stack = {
      dir,
      sockDir,
      ports,
      env: {
        ...Deno.env.toObject(),
        NO_COLOR: "1",
        // devenv's admin operator lands here, never in the developer's own ~/.config.
        XDG_CONFIG_HOME: `${dir}/xdg`,
        ...layoutEnv(
          {
            spireServer: ports.spire,
            mqttPlain: ports.plain,
            mqttTls: ports.tls,
            http: ports.http,
            ...freeMonitoringPorts(3),
          },
          { agentSocketDir: sockDir },
        ),
      },
    };
    const seen = new Map<number, number>(); // every pid we saw, with its start time
    const remember = () => {
      let names: string[] = [];
      try {
        names = [...Deno.readDirSync(`${dir}/.dev-env`)].map((e) => e.name)
          .filter((n) => n.endsWith(".pid")).map((n) => n.slice(0, -4));
      } catch { /* nothing started */ }
      for (const n of names) {
        const rec = readPidFile(`${dir}/.dev-env/${n}.pid`);
        if (!rec || !isRecordAlive(rec)) continue;
        seen.set(rec.pid, rec.startTime);
        for (const d of descendants(rec.pid)) seen.set(d.pid, d.startTime);
      }
    };
    try {
      let first: Record<string, number> = {};
      await t.step(
        "start brings every component up and returns with robot-001 online",
        async () => {
          const r = await mustRun(stack, "start", "--broker", "native", "--broker-svid-ttl", "30");
          assert.match(r.stdout, /robots online: 1 online/);
          assert.match(r.stdout, /Stack ready in/);
          first = pids(stack);
          remember();
          const timings = JSON.parse(await Deno.readTextFile(`${dir}/.dev-env/start-timings.json`));
          assert.equal(timings.ok, true);
          assert.ok(timings.steps.some((s: { name: string }) => s.name === "spire-server"));
          // devenv's admin operator: 0600 credentials, and the operator role on this server.
          const admin = `${dir}/xdg/k8s4r/operators/admin`;
          assert.equal((await Deno.stat(admin)).mode! & 0o777, 0o700);
          assert.equal((await Deno.stat(`${admin}/key.pem`)).mode! & 0o777, 0o600);
          assert.match(
            await Deno.readTextFile(`${dir}/.dev-env/roles.yaml`),
            /admin:\n\s+role: operator\n\s+issuedAfter: /,
          );
          assert.match(r.stdout, /server: started .*https:\/\/localhost:\d+/);
          const tok = await Deno.stat(`${dir}/.dev-env/tokens/robot-001.token`);
          assert.equal(tok.mode! & 0o777, 0o600);
          assert.equal((await Deno.stat(`${dir}/.dev-env/tokens`)).mode! & 0o777, 0o700);
          const token = (await Deno.readTextFile(`${dir}/.dev-env/tokens/robot-001.token`)).trim();
          assert.ok(!(r.stdout + r.stderr).includes(token), "join token in start's output");
          // SPIRE names a join-token agent `spiffe://<td>/spire/agent/join_token/<token>` in its
          // own logs; k8s4r redacts it on the way to the log file. No log may hold the token.
          const logs = [...walkLogs(`${dir}/.dev-env`), ...walkLogs(`${dir}/.spire-data`)];
          assert.ok(logs.some((l) => l.endsWith("spire-server.log")), "spire-server.log scanned");
          for (const log of logs) {
            const text = await Deno.readTextFile(log);
            assert.ok(!text.includes(token), `join token leaked into ${log}`);
          }
          for (const pid of seen.keys()) {
            const cmdline = await Deno.readTextFile(`/proc/${pid}/cmdline`).catch(() => "");
            assert.ok(!cmdline.includes(token), `join token on the command line of pid ${pid}`);
          }
          // The agent runs with V8's memory-saving flags; the server does not.
          const v8Flags = (pid: number) =>
            Deno.readTextFileSync(`/proc/${pid}/environ`).split("\0")
              .find((kv) => kv.startsWith("DENO_V8_FLAGS="));
          assert.match(v8Flags(first.agent) ?? "", /--max-semi-space-size=1,--lite-mode/);
          assert.doesNotMatch(v8Flags(first.server) ?? "", /--lite-mode/);
          // ... and, run from source, with the agent's `deno run` flags (runtime_flags.ts).
          const argv = (pid: number) => Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0");
          for (const f of AGENT_DENO_RUN_FLAGS) {
            assert.ok(argv(first.agent).includes(f), `${f}: ${argv(first.agent).join(" ")}`);
            assert.ok(!argv(first.server).includes(f), `${f}: ${argv(first.server).join(" ")}`);
          }
        },
      );

      await t.step("status --json: every component running and healthy, bundle fresh", async () => {
        const r = await mustRun(stack, "status", "--json");
        const s = JSON.parse(r.stdout);
        const names = s.components.map((c: { name: string }) => c.name);
        assert.deepEqual(names, [
          "spire-server",
          "ca-bundle",
          "broker-identity",
          "mosquitto",
          "server",
          "agent",
        ]);
        for (const c of s.components) {
          assert.equal(c.running, true, `${c.name} not running: ${c.detail}`);
          assert.equal(c.healthy, true, `${c.name} not healthy: ${c.detail}`);
        }
        assert.match(
          s.components.find((c: { name: string }) => c.name === "agent").detail,
          /SVID expires/,
        );
        assert.equal(
          s.components.find((c: { name: string }) => c.name === "mosquitto").pid,
          first.mosquitto,
        );
      });

      const robot = await fetchSvid(`${sockDir}/robot-001/agent.sock`);
      await t.step("the broker serves an SVID whose SPIFFE ID is the broker's", async () => {
        const peer = await peerCert(ports.tls, robot.ca, robot.cert, robot.key);
        assert.match(peer.subjectAltName ?? "", /URI:spiffe:\/\/k8s4r\.example\.org\/mqtt-broker/);
        assert.ok(
          peer.checkIssued(new X509Certificate(robot.ca)) || peer.verify(
            new X509Certificate(robot.ca).publicKey,
          ),
        );
        const ca = await Deno.readTextFile(`${dir}/config/mosquitto/certs/spire-ca.crt`);
        assert.ok(ca.includes("BEGIN CERTIFICATE"));
      });

      await t.step("no certificate, or another robot's topics: nothing gets through", async () => {
        const noCert = await probeMqttTls({ port: ports.tls, ca: robot.ca });
        assert.equal(
          noCert.ok,
          false,
          `a client without certificate was accepted: ${noCert.detail}`,
        );

        const creds = JSON.parse(await Deno.readTextFile(`${dir}/.dev-env/server-mqtt.json`));
        const server = await connect(`mqtt://127.0.0.1:${ports.plain}`, {
          username: creds.username,
          password: creds.password,
          clientId: "devenv-test-server",
        });
        // A robot certificate of the stack's SPIRE for an id no agent runs as: the broker makes
        // a certificate's CN its client id, so robot-001's own SVID would take the running
        // agent's session over.
        const spare = await new SpireServerCli(
          realRunner,
          (await spireBinaries()).server,
          `${dir}/.spire-data/server/api.sock`,
        ).mintX509({
          spiffeId: "spiffe://k8s4r.example.org/robot/robot-099",
          dnsNames: ["robot-099"],
          ttlSeconds: 600,
        });
        const r1 = await connect(`mqtts://127.0.0.1:${ports.tls}`, {
          ca: robot.ca,
          cert: spare.certPem,
          key: spare.keyPem,
          servername: "localhost",
          clientId: "devenv-test-robot-099",
        });
        try {
          const robotGot: string[] = [];
          const serverGot: string[] = [];
          r1.on("message", (topic) => robotGot.push(topic));
          server.on("message", (topic) => serverGot.push(topic));
          await server.subscribeAsync("k8s4r/robots/+/up/#", { qos: 1 });
          await r1.subscribeAsync("k8s4r/robots/robot-099/down/#", { qos: 1 }).catch(() => {});
          await r1.subscribeAsync("k8s4r/robots/robot-002/down/#", { qos: 1 }).catch(() => {});
          await server.publishAsync("k8s4r/robots/robot-002/down/task", "x", { qos: 1 });
          await r1.publishAsync("k8s4r/robots/robot-002/up/status", "spoof", { qos: 1 });
          // Positive controls, sent last: once they arrive, the denied ones would have too.
          await server.publishAsync("k8s4r/robots/robot-099/down/task", "ok", { qos: 1 });
          await r1.publishAsync("k8s4r/robots/robot-099/up/heartbeat", "ok", { qos: 1 });
          await waitFor(
            () =>
              robotGot.includes("k8s4r/robots/robot-099/down/task") &&
              serverGot.includes("k8s4r/robots/robot-099/up/heartbeat"),
            { timeoutMs: 10_000, what: "the allowed messages" },
          );
          assert.ok(
            !robotGot.includes("k8s4r/robots/robot-002/down/task"),
            "read another robot's topic",
          );
          assert.ok(
            !serverGot.includes("k8s4r/robots/robot-002/up/status"),
            "wrote another robot's topic",
          );
        } finally {
          await r1.endAsync(true);
          await server.endAsync(true);
        }
      });

      await t.step("rotation: renewed broker SVID served without a broker restart", async () => {
        const statusFile = `${dir}/.dev-env/broker-identity.json`;
        const before = JSON.parse(await Deno.readTextFile(statusFile)).serial as string;
        let after = before;
        await waitFor(async () => {
          after = JSON.parse(await Deno.readTextFile(statusFile)).serial;
          return after !== before;
        }, { timeoutMs: 90_000, intervalMs: 500, what: "the broker SVID to rotate (TTL 30 s)" });
        const norm = (s: string) => s.toLowerCase().replace(/^0+/, "");
        await waitFor(async () => {
          const peer = await peerCert(ports.tls, robot.ca, robot.cert, robot.key);
          return norm(peer.serialNumber) === norm(after);
        }, { timeoutMs: 10_000, intervalMs: 200, what: "mosquitto to serve the renewed SVID" });
        const rec = readPidFile(`${dir}/.dev-env/mosquitto.pid`)!;
        assert.equal(rec.pid, first.mosquitto, "mosquitto was restarted");
        assert.ok(isRecordAlive(rec));
      });

      await t.step("a second start changes nothing", async () => {
        const r = await mustRun(stack, "start");
        assert.deepEqual(pids(stack), first);
        assert.match(r.stdout, /spire-server: already running/);
        // Robot, broker and fleet-server entries.
        assert.match(r.stdout, /entries: 0 created, 0 updated, 3 unchanged/);
      });

      await t.step("a killed agent is restarted alone; its spire-agent died with it", async () => {
        const kids = descendants(first.agent);
        assert.ok(kids.length >= 1, "the agent has no spire-agent child");
        remember();
        Deno.kill(first.agent, "SIGKILL");
        await waitFor(() => processStartTime(first.agent) === undefined, { timeoutMs: 5000 });
        await waitFor(() => kids.every((k) => processStartTime(k.pid) !== k.startTime), {
          timeoutMs: 10_000,
          what: "the agent's spire-agent to die with it",
        });
        const r = await mustRun(stack, "start");
        assert.match(r.stdout, /0 join token\(s\)/);
        const now = pids(stack);
        assert.notEqual(now.agent, first.agent);
        assert.deepEqual({ ...now, agent: 0 }, { ...first, agent: 0 });
        remember();
      });

      await t.step(
        "stop leaves no process and no listening port; clean removes the state",
        async () => {
          remember();
          const r = await mustRun(stack, "stop");
          assert.match(r.stdout, /spire-server: stopped/);
          for (const [pid, st] of seen) {
            assert.notEqual(processStartTime(pid), st, `pid ${pid} survived stop`);
          }
          const listening = listeningPorts();
          for (const p of Object.values(ports)) {
            assert.ok(!listening.has(p), `port ${p} still listening`);
          }
          const st = await cli(stack, "status");
          assert.notEqual(st.code, 0, "status must fail when the stack is down");
          await mustRun(stack, "clean");
          for (const p of [".dev-env", ".spire-data", "config/mosquitto/certs/spire-ca.crt"]) {
            await assert.rejects(
              Deno.stat(`${dir}/${p}`),
              Deno.errors.NotFound,
              `${p} left behind`,
            );
          }
          await assert.rejects(Deno.stat(`${sockDir}/robot-001/agent.sock`), Deno.errors.NotFound);
        },
      );
    } finally {
      // Whatever happened above, stop what the test started (through devenv's own pid files),
      // and if even that failed, end every process those pid files named, children included.
      remember();
      await cli(stack, "stop").catch(() => {});
      for (const [pid, st] of seen) {
        if (processStartTime(pid) === st) {
          try {
            Deno.kill(pid, "SIGKILL");
          } catch { /* gone */ }
        }
      }
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      await Deno.remove(sockDir, { recursive: true }).catch(() => {});
    }
  },
});

/** Every *.log file under dir, recursively. */
function* walkLogs(dir: string): Generator<string> {
  for (const e of Deno.readDirSync(dir)) {
    const p = `${dir}/${e.name}`;
    if (e.isDirectory) yield* walkLogs(p);
    else if (e.isFile && e.name.endsWith(".log")) yield p;
  }
}
