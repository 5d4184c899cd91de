import assert from "node:assert/strict";
import { Args } from "../cli/mod.ts";
import { bufferIo } from "../cli/io.ts";
import { RecordingRunner } from "../process/mod.ts";
import { TestCa } from "../spiffe/testing/test_ca.ts";
import { brokerFilesUsable } from "./broker.ts";
import {
  type Component,
  devenvComponents,
  needName,
  StackView,
  stackView,
  StartRun,
} from "./components.ts";
import { resolveContext, robotLayouts, withAdvertise, writeState } from "./context.ts";
import { spireServerOptions } from "./spire_server_run.ts";
import type { SpireBinaries } from "../spire/binaries.ts";
import { writeFileAtomic } from "../fs/atomic.ts";
import { checkGraph } from "./graph.ts";
import { logSources } from "./logs.ts";
import { stopOrder } from "./stop.ts";

function ctxFor(dir: string, env: Record<string, string> = {}, runner?: RecordingRunner) {
  const io = bufferIo({ cwd: dir, env, runner });
  return resolveContext(new Args(["devenv", "status"], new Map(), [], []), io);
}

function table(dir: string, robots = ["robot-001", "robot-002"]): Component[] {
  const ctx = ctxFor(dir);
  return devenvComponents(new StackView(ctx, robotLayouts(ctx, robots)));
}

/** Every component `name` waits for, directly or not. */
function closure(rows: Component[], name: string): Set<string> {
  const by = new Map(rows.map((c) => [c.name, c]));
  const out = new Set<string>();
  const walk = (n: string) => {
    for (const d of by.get(n)!.needs.map(needName)) {
      if (!out.has(d)) {
        out.add(d);
        walk(d);
      }
    }
  };
  walk(name);
  return out;
}

Deno.test("component table: a well-formed graph; every daemon has a pid file, spawn, probe and stop rank", () => {
  const rows = table("/p");
  checkGraph(rows.map((c) => ({ name: c.name, needs: c.needs.map(needName) })));
  for (const c of rows) {
    if (c.kind === "daemon") {
      assert.ok(c.pidFile && c.spawn && c.probe && c.stopRank !== undefined, c.name);
      assert.ok(c.status, `${c.name} has no status row`);
    } else {
      assert.ok(c.run && !c.pidFile && !c.spawn, c.name);
    }
  }
  // Status shows exactly these, in this order (status --json is an interface).
  assert.deepEqual(rows.filter((c) => c.status).map((c) => c.name), [
    "spire-server",
    "ca-bundle",
    "broker-identity",
    "mosquitto",
    "server",
    "agent",
    "agent-robot-002",
  ]);
});

Deno.test("component table: entries and tokens are made before any SPIRE agent starts", () => {
  const rows = table("/p");
  for (const name of ["broker-identity", "agent", "agent-robot-002"]) {
    const before = closure(rows, name);
    assert.ok(before.has("spire-server"), `${name} may start before the SPIRE server`);
    assert.ok(before.has("identities"), `${name} may start before its token and entry exist`);
  }
  // Every robot's agent comes up only once the server is subscribed (its register must land).
  assert.ok(closure(rows, "agent").has("server"));
  assert.ok(closure(rows, "robots online").has("agent-robot-002"));
  // Independent of each other: the broker path and the SPIRE server start side by side.
  assert.ok(!closure(rows, "spire-server").has("broker-runtime"));
  assert.ok(!closure(rows, "broker-runtime").has("spire-server"));
});

Deno.test("stop order: agents together first, then server, broker-identity, mosquitto, spire-server", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.mkdir(`${dir}/.dev-env`);
    await Deno.writeTextFile(`${dir}/.dev-env/agent-robot-007.pid`, "{}");
    const order = stopOrder(ctxFor(dir));
    assert.deepEqual(order.map((t) => [t.name, t.stopRank]), [
      ["agent-robot-007", 10],
      ["server", 20],
      ["broker-identity", 30],
      ["mosquitto", 40],
      ["spire-server", 90],
    ]);
    assert.ok(order.every((t) => t.pidFile.startsWith(`${dir}/.dev-env/`)));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("logs come from the table, in table order", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.mkdir(`${dir}/.dev-env`);
    await Deno.writeTextFile(`${dir}/.dev-env/agent-robot-002.pid`, "{}");
    assert.deepEqual(logSources(ctxFor(dir)).map((s) => s.name), [
      "spire-server",
      "broker-identity",
      "spire-agent-broker",
      "mosquitto",
      "server",
      "agent-robot-002",
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("brokerFilesUsable: a valid chain to the bundle passes; expiry, wrong key, other CA do not", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const ctx = ctxFor(dir);
    const { files, layout } = ctx;
    const root = TestCa.create({ trustDomain: "k8s4r.example.org" });
    const ca = root.intermediate();
    const put = async (cert: string, key: string, bundle: string) => {
      await writeFileAtomic(files.brokerCertFile, cert, 0o600);
      await writeFileAtomic(files.brokerKeyFile, key, 0o600);
      await writeFileAtomic(layout.caBundleFile, bundle, 0o644);
    };
    const good = ca.issue({
      spiffeId: "spiffe://k8s4r.example.org/mqtt-broker",
      dnsNames: ["localhost"],
    });
    assert.match((await brokerFilesUsable(ctx)).detail, /No such file|not found|ENOENT/i);
    await put(good.chainPem, good.keyPem, root.rootPem);
    const ok = await brokerFilesUsable(ctx);
    assert.equal(ok.ok, true, ok.detail);

    const other = TestCa.create({ trustDomain: "k8s4r.example.org" });
    await put(good.chainPem, good.keyPem, other.rootPem);
    assert.match((await brokerFilesUsable(ctx)).detail, /not issued by the exported bundle/);

    const stranger = ca.issue({ spiffeId: "spiffe://k8s4r.example.org/mqtt-broker" });
    await put(good.chainPem, stranger.keyPem, root.rootPem);
    assert.match((await brokerFilesUsable(ctx)).detail, /key does not match/);

    const expiring = ca.issue({
      spiffeId: "spiffe://k8s4r.example.org/mqtt-broker",
      ttlSeconds: 30,
    });
    await put(expiring.chainPem, expiring.keyPem, root.rootPem);
    assert.match((await brokerFilesUsable(ctx)).detail, /certificate expires/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("spire-binaries: version-checked once, again only when a binary changed", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const bin = `${dir}/bin`;
    await Deno.mkdir(bin);
    for (const b of ["spire-server", "spire-agent"]) {
      await Deno.writeTextFile(`${bin}/${b}`, "#!/bin/sh\n", { mode: 0o755 });
    }
    const runner = new RecordingRunner(() => ({ stdout: "1.13.3\n" }));
    const ctx = ctxFor(dir, { K8S4R_SPIRE_BIN_DIR: bin }, runner);
    await Deno.mkdir(ctx.layout.devEnvDir);
    const step = () => {
      const run = new StartRun(ctx, [], { robots: [], broker: "native" });
      return devenvComponents(run).find((c) => c.name === "spire-binaries")!.run!(run);
    };
    assert.match(await step(), new RegExp(`${bin}/spire-server \\(env\\)`));
    assert.equal(runner.calls.length, 2); // spire-server --version, spire-agent --version
    await step();
    assert.equal(runner.calls.length, 2, "checked again although nothing changed");
    await Deno.writeTextFile(`${bin}/spire-agent`, "#!/bin/sh\n# rebuilt\n");
    await step();
    assert.equal(runner.calls.length, 4, "a changed binary was not checked again");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("task-user step: as root, ensures k8s4r-task for the robots' tasks; otherwise says what a task can reach", async () => {
  const passwd = "k8s4r-task:x:998:998::/nonexistent:/usr/sbin/nologin\n";
  const runner = new RecordingRunner((cmd, args) =>
    cmd === "getent" && args[1] === "k8s4r-task" ? { stdout: passwd } : { code: 2 }
  );
  const ctx = ctxFor("/p", {}, runner);
  const step = (run: StartRun) => devenvComponents(run).find((c) => c.name === "task-user")!;
  const agent = (run: StartRun) => devenvComponents(run).find((c) => c.name === "agent")!;
  const robots = robotLayouts(ctx, ["robot-001"]);
  assert.ok(
    agent(new StartRun(ctx, robots, { robots: ["robot-001"], broker: "native" })).needs
      .map(needName).includes("task-user"),
  );

  // Not root: no task user, and the line says what that means.
  const user = new StartRun(ctx, robots, { robots: ["robot-001"], broker: "native" });
  Object.defineProperty(user, "uid", { value: 1000 });
  const text = await step(user).run!(user);
  assert.equal(user.taskUser, undefined);
  assert.match(text, /^not root \(uid 1000\): tasks run as uid 1000, the agents' own/);
  assert.match(text, /a task can fetch its robot's SVID and private key from the Workload API/);
  assert.match((ctx.io as unknown as { err(): string }).err(), /warning: task-user: not root/);
  assert.equal(runner.calls.length, 0, "nothing created without root");

  // Root (with CAP_SETUID/CAP_SETGID/CAP_KILL, as devenv's tests run): the user is looked up,
  // created only when missing, and handed to the agents.
  const root = new StartRun(ctx, robots, { robots: ["robot-001"], broker: "native" });
  Object.defineProperty(root, "uid", { value: 0 });
  assert.equal(Deno.uid(), 0, "run as root (CI does): the step needs the capabilities of root");
  const made = await step(root).run!(root);
  assert.equal(root.taskUser, "k8s4r-task");
  assert.match(made, /^k8s4r-task \(uid 998\): tasks run as it/);
  assert.deepEqual(runner.calls.map((c) => c.cmd), ["getent"], "it existed: no useradd");
});

Deno.test("HA table: postgres, spire-database, root-ca, two SPIRE servers and haproxy; the rest waits for them", () => {
  const ctx = ctxFor("/p");
  const rows = devenvComponents(
    new StackView(ctx, robotLayouts(ctx, ["robot-001"]), { ha: true, rootCa: true }),
  );
  checkGraph(rows.map((c) => ({ name: c.name, needs: c.needs.map(needName) })));
  assert.deepEqual(rows.filter((c) => c.status).map((c) => c.name), [
    "postgres",
    "root-ca",
    "spire-server",
    "spire-server-2",
    "haproxy",
    "ca-bundle",
    "broker-identity",
    "mosquitto",
    "server",
    "server-2",
    "server-3",
    "agent",
  ]);
  for (const s of ["server", "server-2", "server-3"]) {
    assert.ok(closure(rows, s).has("fleet-database"), `${s} does not wait for its registry`);
  }
  for (const c of rows.filter((c) => c.kind === "daemon")) {
    assert.ok(c.pidFile && c.spawn && c.probe && c.stopRank !== undefined, c.name);
  }
  for (const n of ["postgres", "spire-server", "spire-server-2", "haproxy", "server-3"]) {
    assert.match(rows.find((c) => c.name === n)!.hint!(new StackView(ctx, [])), /devenv start/);
  }
  // Both servers need the database and the root CA; the second waits for the first's schema.
  for (const s of ["spire-server", "spire-server-2"]) {
    const before = closure(rows, s);
    assert.ok(before.has("spire-database") && before.has("postgres") && before.has("root-ca"), s);
  }
  assert.ok(closure(rows, "spire-server-2").has("spire-server"));
  // The bundle is exported once both servers added their CA; agents dial through haproxy.
  assert.ok(closure(rows, "ca-bundle").has("spire-server-2"));
  for (const a of ["agent", "broker-identity"]) assert.ok(closure(rows, a).has("haproxy"), a);
  // Stop: haproxy after the agents, the SPIRE servers after haproxy, PostgreSQL last, by SIGINT.
  const rank = (n: string) => rows.find((c) => c.name === n)!.stopRank!;
  assert.ok(rank("agent") < rank("haproxy") && rank("haproxy") < rank("spire-server"));
  assert.ok(rank("spire-server-2") < rank("postgres"));
  assert.equal(rows.find((c) => c.name === "postgres")!.stopSignal, "SIGINT");
  // Logs of every new component.
  const view = new StackView(ctx, [], { ha: true, rootCa: true });
  const names = devenvComponents(view).flatMap((c) => c.logs ?? []).map((l) => l.name);
  for (const n of ["postgres", "spire-server-2", "haproxy"]) assert.ok(names.includes(n), n);
});

Deno.test("root-ca alone (no --ha): one SPIRE server on SQLite under the root CA", () => {
  const ctx = ctxFor("/p");
  const rows = devenvComponents(
    new StackView(ctx, robotLayouts(ctx, ["robot-001"]), { ha: false, rootCa: true }),
  );
  const names = rows.map((c) => c.name);
  assert.ok(names.includes("root-ca") && !names.includes("postgres"), names.join());
  assert.ok(!names.includes("spire-server-2") && !names.includes("haproxy"));
  assert.ok(closure(rows, "spire-server").has("root-ca"));
});

Deno.test("--ha with --advertise and --attestation x509pop: haproxy binds ADDR, both SPIRE servers run the x509pop attestor behind it on loopback", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const addr = "10.203.9.1";
    const runner = new RecordingRunner();
    const ctx = withAdvertise(ctxFor(dir, {}, runner), addr);
    // The children get both: the HA ports and the advertised address.
    assert.equal(ctx.layoutEnv.K8S4R_ADVERTISE, addr);
    assert.equal(ctx.layoutEnv.K8S4R_SPIRE_SERVER_HOST, addr);
    assert.equal(ctx.layoutEnv.K8S4R_SPIRE_SERVER_PORTS, ctx.layout.ha.spireServerPorts.join(","));
    assert.equal(ctx.layoutEnv.K8S4R_POSTGRES_PORT, String(ctx.layout.ha.postgresPort));
    const mode = { ha: true, rootCa: true };
    const run = new StartRun(ctx, [], {
      robots: [],
      broker: "native",
      mode,
      advertise: addr,
      x509pop: true,
    });
    const bins = { server: "/b/spire-server", agent: "/b/spire-agent", source: "env", version: "" };
    run.setBins(bins as SpireBinaries);
    run.spire = bins as SpireBinaries;
    const rows = devenvComponents(run);
    const names = rows.map((c) => c.name);
    for (const n of ["factory-ca", "control-host", "postgres", "haproxy", "spire-server-2"]) {
      assert.ok(names.includes(n), `${n} is not in the table: ${names.join(", ")}`);
    }
    for (const s of ["spire-server", "spire-server-2"]) {
      assert.ok(closure(rows, s).has("factory-ca"), `${s} starts before its factory CA`);
      await rows.find((c) => c.name === s)!.spawn!(run);
      const args = runner.calls[runner.calls.length - 1].args;
      const ca = args.indexOf("--x509pop-ca");
      assert.ok(ca > 0, `${s}: no --x509pop-ca in ${args.join(" ")}`);
      assert.equal(args[ca + 1], `${ctx.layout.factoryCaDir}/ca.crt`);
      assert.ok(args.includes("--ha"), s);
    }
    // haproxy's frontend (the SPIRE port everyone dials) is the advertised address; the two
    // servers behind it stay on loopback.
    await rows.find((c) => c.name === "haproxy")!.spawn!(run);
    const cfg = await Deno.readTextFile(ctx.files.haproxyConfig);
    assert.match(cfg, new RegExp(`\\n  bind ${addr}:${ctx.layout.ports.spireServer}\\n`));
    for (const p of ctx.layout.ha.spireServerPorts) {
      assert.match(cfg, new RegExp(`server spire-server(-2)? 127\\.0\\.0\\.1:${p} check`));
    }
    // What `devenv spire-server` gives SPIRE: loopback on --ha, the address without it.
    await writeFileAtomic(ctx.layout.ha.spirePasswordFile, "pw\n", 0o600);
    const o2 = await spireServerOptions(ctx, "/b/spire-server", {
      server: 2,
      ha: true,
      rootCa: true,
      x509popCaBundle: "/f/ca.crt",
    });
    assert.equal(o2.bindAddress, "127.0.0.1");
    assert.equal(o2.port, ctx.layout.ha.spireServerPorts[1]);
    assert.equal(o2.x509popCaBundle, "/f/ca.crt");
    assert.equal(o2.datastore?.type, "postgres");
    // Each server has its own loopback telemetry port (what --monitoring scrapes).
    assert.deepEqual(o2.telemetry, {
      host: "127.0.0.1",
      port: ctx.files.spireServer2TelemetryPort,
    });
    const o1 = await spireServerOptions(ctx, "/b/spire-server", { x509popCaBundle: "/f/ca.crt" });
    assert.deepEqual(o1.telemetry, { host: "127.0.0.1", port: ctx.files.spireServerTelemetryPort });
    assert.notEqual(o1.telemetry?.port, o2.telemetry?.port);
    assert.equal(o1.bindAddress, addr);
    assert.equal(o1.port, ctx.layout.ports.spireServer);
    assert.equal(o1.x509popCaBundle, "/f/ca.crt");
    assert.equal(o1.datastore, undefined);
    // status, stop and the doctor see the stack at the address it was started with.
    await writeState(ctx, { robots: [], mode, advertise: addr, createdSocketDirs: [], env: {} });
    assert.equal(stackView(ctxFor(dir)).ctx.layout.advertise, addr);
    await writeState(ctx, { robots: [], mode, createdSocketDirs: [], env: {} });
    assert.equal(stackView(ctxFor(dir)).ctx.layout.advertise, undefined);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
