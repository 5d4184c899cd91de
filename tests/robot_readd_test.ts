/**
 * `k8s4r robot add` of a robot that `robot remove` cut off, with the real CLI against a REAL
 * spire-server and a REAL Mosquitto (tests/helpers/control_host.ts).
 *
 * The broker tells a robot's old SVID from its new one by nothing but the CN: lifting the
 * cut-off lets every SVID the robot held before its removal in again, until it expires. So:
 * - a re-add that fails (a CSR for another CN) changes nothing: the cut-off stays, SPIRE gets no
 *   entry (it used to lift the cut-off first, and the old SVID got PUBACK 0);
 * - a re-add while SVIDs from before the removal can still be valid is refused, and says until
 *   when; `--force` does it anyway, with a warning, and the old SVID is then accepted again (the
 *   positive control: lifting works, and this is exactly what `--force` gives up);
 * - once that time has passed (the records say so), a re-add lifts the cut-off by itself.
 */
import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { join } from "node:path";
import mqtt from "mqtt";
import type { MqttClient } from "mqtt";
import { ensureFactoryCa, factoryCaFiles } from "../src/control/factory_ca.ts";
import { renderControlConfig } from "../src/control/config.ts";
import { nodeSpiffeId, robotSpiffeId } from "../src/fleet/ids.ts";
import { upTopic } from "../src/fleet/topics.ts";
import { DynsecAdmin, removedUsernames } from "../src/mqtt/dynsec.ts";
import { createCsr, csrToPem } from "../src/spiffe/csr.ts";
import { startCli } from "./helpers/cli.ts";
import { startControlHost, TD } from "./helpers/control_host.ts";
import { pubackCode } from "./helpers/mqtt_codes.ts";
import { spireBinaries } from "./helpers/spire.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };
const ID = "robot-001";

Deno.test({
  name:
    "robot add after robot remove: a failed re-add keeps the cut-off; a re-add within the old SVIDs' lifetime is refused unless --force; after it, lifted",
  ...opts,
  async fn() {
    const ch = await startControlHost();
    const clients: MqttClient[] = [];
    try {
      const dir = ch.dir;
      const factory = factoryCaFiles(join(dir, "factory"));
      await ensureFactoryCa(factory, "test factory CA");
      const adminFile = join(dir, "broker-admin.json");
      await Deno.writeTextFile(adminFile, JSON.stringify(ch.broker.admin), { mode: 0o600 });
      const records = join(dir, "robots.json");
      const config = join(dir, "control-host.json");
      await Deno.writeTextFile(
        config,
        renderControlConfig({
          trustDomain: TD,
          spireServer: {
            adminSocket: join(dir, "s", "api.sock"),
            address: `${ch.address}:${ch.spirePort}`,
            bin: (await spireBinaries()).server,
          },
          broker: {
            url: `ssl://${ch.address}:${ch.broker.tlsPort}`,
            adminAddress: `127.0.0.1:${ch.broker.plainPort}`,
            adminCredentials: adminFile,
          },
          robotSelectors: [`unix:uid:${Deno.uid()}`],
          factoryCa: factory,
          records,
        }),
      );
      const robot = async (...args: string[]) => {
        const p = startCli(["robot", ...args, "--control-config", config], { cwd: dir });
        const code = await p.exited;
        return { code, stdout: p.stdout(), stderr: p.stderr() };
      };
      const mustRobot = async (...args: string[]) => {
        const r = await robot(...args);
        assert.equal(r.code, 0, `robot ${args.join(" ")}:\n${r.stdout}\n${r.stderr}`);
        return r;
      };
      /** PUBACK of a heartbeat with the SVID robot-001 held before its removal. */
      const oldSvid = await ch.cli.mintX509({
        spiffeId: robotSpiffeId(TD, ID),
        dnsNames: [ID],
        ttlSeconds: 3600,
      });
      const withOldSvid = async () => {
        const c = await mqtt.connectAsync(ch.broker.tlsUrl, {
          key: oldSvid.keyPem,
          cert: oldSvid.certPem,
          ca: oldSvid.bundlePem,
          servername: "localhost",
          clientId: ID,
          protocolVersion: 5,
          reconnectPeriod: 0,
          connectTimeout: 5000,
        });
        clients.push(c);
        try {
          return await pubackCode(c, upTopic(ID, "heartbeat"));
        } finally {
          await c.endAsync(true);
        }
      };
      const cutOff = async () => {
        const a = await DynsecAdmin.connect({ port: ch.broker.plainPort, ...ch.broker.admin });
        try {
          return (await removedUsernames(a)).includes(ID);
        } finally {
          await a.close();
        }
      };
      const spireHas = async () =>
        (await ch.cli.listEntries()).some((e) =>
          e.spiffeId === nodeSpiffeId(TD, ID) || e.spiffeId === robotSpiffeId(TD, ID)
        );

      await mustRobot("add", ID, "--out", join(dir, "a.json"));
      assert.ok((await withOldSvid()) < 0x80, "control: the SVID works while the robot is added");
      await mustRobot("remove", ID);
      assert.equal(await withOldSvid(), 0x87, "removed: refused");

      // A re-add that fails validation: a CSR for another robot.
      const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
      const csr = join(dir, "wrong.csr");
      await Deno.writeTextFile(
        csr,
        csrToPem(createCsr({ commonName: "robot-002", key: privateKey })),
      );
      const bad = await robot("add", ID, "--attestation", "x509pop", "--csr", csr, "--force");
      assert.equal(bad.code, 2, bad.stderr);
      assert.match(bad.stderr, /the CSR is for CN=robot-002, not robot-001/);
      assert.deepEqual(
        { cutOff: await cutOff(), oldSvid: await withOldSvid(), spireEntries: await spireHas() },
        { cutOff: true, oldSvid: 0x87, spireEntries: false },
        "a failed robot add un-removed the robot",
      );

      // A valid re-add while the old SVIDs may still be valid (SPIRE's default 1 h): refused.
      const early = await robot("add", ID, "--out", join(dir, "b.json"));
      assert.equal(early.code, 1, early.stdout + early.stderr);
      assert.match(
        early.stderr,
        /robot add: robot-001 was removed at \S+; SVIDs it got before that stay valid until \S+ \(\d+ min from now\)/,
      );
      assert.match(early.stderr, /--force/);
      assert.deepEqual(
        { cutOff: await cutOff(), oldSvid: await withOldSvid(), spireEntries: await spireHas() },
        { cutOff: true, oldSvid: 0x87, spireEntries: false },
        "a refused robot add changed something",
      );

      // --force: done, with a warning; the old SVID is accepted again (what --force gives up).
      const forced = await mustRobot("add", ID, "--out", join(dir, "c.json"), "--force");
      assert.match(forced.stderr, /warning: .*robot-001.* until \S+/);
      assert.match(forced.stdout, /broker: lifted the cut-off of robot-001/);
      assert.deepEqual(
        { cutOff: await cutOff(), oldSvid: (await withOldSvid()) < 0x80, spire: await spireHas() },
        { cutOff: false, oldSvid: true, spire: true },
      );

      // Removed again; once the records say the old SVIDs have expired, no --force is needed.
      await mustRobot("remove", ID);
      assert.equal(await withOldSvid(), 0x87);
      const doc = JSON.parse(await Deno.readTextFile(records));
      assert.ok(doc.robots[ID].svidsValidUntil, JSON.stringify(doc.robots[ID]));
      const past = new Date(Date.now() - 60_000).toISOString();
      doc.robots[ID] = { ...doc.robots[ID], removedAt: past, svidsValidUntil: past };
      await Deno.writeTextFile(records, JSON.stringify(doc));
      const late = await mustRobot("add", ID, "--out", join(dir, "d.json"));
      assert.match(late.stdout, /broker: lifted the cut-off of robot-001/);
      assert.doesNotMatch(late.stderr, /warning/);
      assert.equal(await cutOff(), false);
    } finally {
      for (const c of clients) c.end(true);
      await ch.stop();
    }
  },
});
