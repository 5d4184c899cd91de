/**
 * Backup and restore, end to end, by the README's "Backup and restore" commands: a running
 * stack (real SPIRE, Mosquitto, fleet server, two robots that have attested and run a task) is
 * backed up while it runs; then the control host's state is destroyed (everything but the
 * robots' own SPIRE agent data: what a robot keeps on its own host), the backup restored and the
 * stack started again. What must hold:
 *
 * - the same robots come back online with their existing SPIRE agent SVIDs: SPIRE knows the
 *   same agents (no new attestation), and no join token is made for a robot (the only token is
 *   for the broker's node, which is part of the control host);
 * - the trust bundle is the one of before (SPIRE's keys came back), the fleet registry has the
 *   task of before, and a new task round trip works;
 * - the backup's files are 0600 in a 0700 directory, and restore refuses (control) a control
 *   host that is not clean, before anything is destroyed.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { X509Certificate } from "node:crypto";
import { parsePemCerts } from "../../src/broker/identity.ts";
import { robotLayout } from "../../src/devenv/layout.ts";
import { readmeSteps } from "../helpers/readme_commands.ts";
import { E2eStack, metric, ROBOTS } from "./stack.ts";

const stack = await E2eStack.create({ heartbeatSeconds: 1 });
const test = stack.caseRegistrar("backup: ");
const BACKUP = "k8s4r-backup";

/** The serial of the agent SVID a robot's SPIRE agent holds in its own data dir. */
async function agentSvidSerial(robotId: string): Promise<string> {
  const dir = robotLayout(stack.layout, robotId, stack.env).agentDataDir;
  const data = JSON.parse(await Deno.readTextFile(`${dir}/agent-data.json`));
  const pem = Buffer.from(data.svid[0], "base64").toString("utf8");
  return new X509Certificate(pem).serialNumber;
}

const before = {
  agents: [] as string[],
  serials: new Map<string, string>(),
  bundle: "",
  task: "",
};

test("a running stack: two attested robots and a finished task", async () => {
  await stack.start();
  stack.started = true;
  await stack.waitOnline(ROBOTS, 60_000);
  before.task = await stack.createTask("robot-001", ["echo", "before the backup"]);
  assert.equal((await stack.waitTask(before.task)).state, "done");
  before.agents = (await stack.spireCli().listAgents()).map((a) => a.id).sort();
  assert.ok(before.agents.length >= 3, `agents: ${before.agents.join(", ")}`);
  for (const id of ROBOTS) before.serials.set(id, await agentSvidSerial(id));
  before.bundle = parsePemCerts(await stack.spireCli().bundlePem()).map((c) => c.fingerprint256)
    .join();
});

test("the README's backup commands: backed up running, restored onto a clean control host, the same robots back without a token", async () => {
  const steps = readmeSteps("backup");
  let restored = false;
  for (const step of steps) {
    assert.equal(step.host, "control host", `README.md:${step.line}`);
    if (step.copy.length) {
      assert.deepEqual(step.copy, [BACKUP]);
      // Control: restore refuses this host while it still has its state.
      const refused = await stack.k8s4r(["backup", "restore", BACKUP]);
      assert.equal(refused.code, 1, refused.stdout + refused.stderr);
      assert.match(refused.stderr, /not a clean control host/);
      await destroyControlHost();
    }
    const args = step.argv.slice(1);
    const full = args[0] === "devenv" && args[1] === "start"
      ? [...args, "--broker", "native"]
      : args;
    const t0 = Date.now();
    const r = await stack.k8s4r(full);
    stack.remember();
    assert.equal(
      r.code,
      0,
      `README.md:${step.line}: k8s4r ${full.join(" ")}:\n${r.stdout}\n${r.stderr}`,
    );
    if (args[0] === "backup" && args[1] === "create") {
      metric("backup.create_ms", Date.now() - t0);
      const m = JSON.parse(await Deno.readTextFile(`${stack.dir}/${BACKUP}/manifest.json`));
      const names = m.items.map((i: { name: string }) => i.name);
      for (const n of ["spire-datastore", "spire-keys", "fleet-registry", "server-mqtt.json"]) {
        assert.ok(names.includes(n), `the backup has no ${n}: ${names.join(", ")}`);
      }
      assert.equal(Deno.statSync(`${stack.dir}/${BACKUP}`).mode! & 0o777, 0o700);
      for (const e of Deno.readDirSync(`${stack.dir}/${BACKUP}`)) {
        assert.equal(
          Deno.statSync(`${stack.dir}/${BACKUP}/${e.name}`).mode! & 0o777,
          0o600,
          e.name,
        );
      }
      metric("backup.bytes", m.items.reduce((n: number, i: { bytes: number }) => n + i.bytes, 0));
    }
    if (args[0] === "backup" && args[1] === "restore") restored = true;
    if (args[0] === "devenv" && args[1] === "start" && restored) {
      metric("backup.start_after_restore_ms", Date.now() - t0);
      // One token, for the broker's node (control-host state); none for a robot.
      assert.match(r.stdout, /identities: 1 join token\(s\)/);
      for (const id of ROBOTS) {
        const tok = robotLayout(stack.layout, id, stack.env).joinTokenFile;
        assert.throws(() => Deno.statSync(tok), Deno.errors.NotFound, `a new token for ${id}`);
      }
    }
  }
  console.log("  every README step ran");
  assert.ok(restored, "the README block restores nothing");
  await stack.waitOnline(ROBOTS, 60_000);
  // The same agents: SPIRE knows exactly the robots' agents of before (plus the broker's new
  // node), and each robot's SPIRE agent holds the agent SVID it had.
  const after = (await stack.spireCli().listAgents()).map((a) => a.id).sort();
  const robotAgents = before.agents.filter((a) => after.includes(a));
  assert.ok(robotAgents.length >= ROBOTS.length, `agents before ${before.agents}, after ${after}`);
  assert.equal(after.length, before.agents.length + 1, `agents after: ${after.join(", ")}`);
  for (const id of ROBOTS) {
    assert.equal(await agentSvidSerial(id), before.serials.get(id), `${id} has a new agent SVID`);
  }
  const bundle = parsePemCerts(await stack.spireCli().bundlePem()).map((c) => c.fingerprint256)
    .join();
  assert.equal(bundle, before.bundle, "the trust bundle changed");
  // The registry of before, and the fleet works.
  const old = await stack.task(before.task);
  assert.equal(old.state, "done");
  assert.equal(old.stdout, "before the backup\n");
  const t = await stack.createTask("robot-002", ["echo", "after the restore"]);
  const done = await stack.waitTask(t);
  assert.equal(done.state, "done", JSON.stringify(done));
  assert.equal(done.stdout, "after the restore\n");
  for (const id of ROBOTS) await stack.waitHeartbeats(id, 2, 30_000);
});

/** What a new control host does not have: everything but the robots' SPIRE agent data. */
async function destroyControlHost(): Promise<void> {
  assert.deepEqual(stack.survivors(), [], "processes still run after devenv stop");
  const keep = new Set(
    ROBOTS.map((id) => robotLayout(stack.layout, id, stack.env).agentDataDir),
  );
  for (const e of Deno.readDirSync(stack.layout.spireDataDir)) {
    const p = `${stack.layout.spireDataDir}/${e.name}`;
    if (!keep.has(p)) await Deno.remove(p, { recursive: true });
  }
  await Deno.remove(stack.layout.devEnvDir, { recursive: true });
  await Deno.remove(stack.layout.caBundleFile);
  for (const p of [stack.layout.spireServerDataDir, stack.layout.serverDataDir]) {
    assert.throws(() => Deno.statSync(p), Deno.errors.NotFound, p);
  }
}

test("teardown: nothing of ours survives", async () => {
  await stack.teardown();
});
