/**
 * The x509pop node alias `robot add` writes (`x509pop:subject:cn:<id>` and
 * `x509pop:serialnumber:<FactoryCa's serialHex>`) against what a REAL spire-server derives from
 * the robot's certificate. SPIRE writes the serial as lowercase hex padded to whole bytes, so a
 * serial whose first byte is below 0x10 is `0a19…`; k8s4r used to write `a19…`, and that alias
 * matched no agent: the robot attested and then got "PermissionDenied: no identity issued"
 * forever. Random serials have a first byte of 0x01-0x0f about one time in nine (the
 * ha_remote e2e flake, robot-008). The serials here are fixed: 0x4b… is the positive control
 * (both spellings agree), 0x0a… the case.
 */
import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { join } from "node:path";
import { bufferIo } from "../src/cli/io.ts";
import { ensureFactoryCa, FactoryCa, factoryCaFiles } from "../src/control/factory_ca.ts";
import { nodeSpiffeId, robotSpiffeId } from "../src/fleet/ids.ts";
import { processStartTime, realRunner, waitFor } from "../src/process/mod.ts";
import { createCsr, csrToPem } from "../src/spiffe/csr.ts";
import { X509Source } from "../src/spiffe/mod.ts";
import type { SpireAgentSupervisor } from "../src/spire/agent.ts";
import { type SpireServerDaemon, startSpireServer } from "../src/spire/server.ts";
import { SpireServerCli } from "../src/spire/server.ts";
import { freePort } from "./helpers/ports.ts";
import { spireBinaries, tmpSpireAgent } from "./helpers/spire.ts";

const TD = "k8s4r.example.org";
const REPO = new URL("..", import.meta.url).pathname;

Deno.test({
  name:
    "real SPIRE x509pop: the node alias's serialnumber selector matches the agent's, also for a serial with a leading 0 nibble (0x0a…), and the robot gets its SVID",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    const bins = await spireBinaries();
    const tmp = await Deno.makeTempDir({ dir: "/tmp", prefix: "k8s4r-xs-" });
    const io = bufferIo({ env: Deno.env.toObject(), runner: realRunner, cwd: tmp });
    const port = freePort();
    const agents: SpireAgentSupervisor[] = [];
    const pids: number[] = [];
    let server: SpireServerDaemon | undefined;
    try {
      const files = factoryCaFiles(join(tmp, "factory"));
      await ensureFactoryCa(files, "test factory CA");
      const ca = await FactoryCa.load(files);
      server = await startSpireServer(io, {
        bin: bins.server,
        configFile: `${REPO}config/spire/server.conf`,
        cwd: tmp,
        port,
        socketPath: `${tmp}/s/api.sock`,
        logFile: `${tmp}/spire-server.log`,
        pidFile: `${tmp}/spire-server.pid`,
        x509popCaBundle: files.cert,
        cacheReloadInterval: "500ms",
        attestationRateLimit: false,
      });
      pids.push(server.pid);
      const cli = new SpireServerCli(realRunner, bins.server, server.socketPath);
      await Deno.writeTextFile(`${tmp}/bundle.pem`, await cli.bundlePem());

      const cases = [
        { name: "control: first byte 0x4b", id: "robot-041", first: 0x4b, hex: "4b" },
        { name: "first byte 0x0a: the selector says 0a…", id: "robot-010", first: 0x0a, hex: "0a" },
      ];
      for (const c of cases) {
        await t.step(c.name, async () => {
          const dir = join(tmp, c.id);
          await Deno.mkdir(dir, { recursive: true });
          const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
          const csr = csrToPem(createCsr({ commonName: c.id, key: privateKey }));
          const serial = Uint8Array.from([c.first, 0x19, 0xc2, 0xcf, 0xe7, 0xee, 0x79, 0x1a]);
          const signed = ca.signCsr(csr, c.id, 3_600_000, Date.now(), serial);
          assert.equal(signed.serialHex, `${c.hex}19c2cfe7ee791a`);
          await Deno.writeTextFile(join(dir, "cert.pem"), signed.chainPem);
          await Deno.writeTextFile(
            join(dir, "key.pem"),
            privateKey.export({ format: "pem", type: "pkcs8" }).toString(),
            { mode: 0o600 },
          );
          // What `robot add --attestation x509pop` creates: the node alias, its workload entry.
          const nodeId = nodeSpiffeId(TD, c.id);
          await cli.createEntry({
            node: true,
            spiffeId: nodeId,
            parentId: `spiffe://${TD}/spire/server`,
            selectors: [`x509pop:subject:cn:${c.id}`, `x509pop:serialnumber:${signed.serialHex}`],
            dnsNames: [],
          });
          await cli.createEntry({
            spiffeId: robotSpiffeId(TD, c.id),
            parentId: nodeId,
            selectors: [`unix:uid:${Deno.uid()}`],
            dnsNames: [c.id],
          });

          const agent = tmpSpireAgent(bins, dir, {
            trustDomain: TD,
            serverPort: port,
            trustBundlePath: `${tmp}/bundle.pem`,
            joinTokenFile: undefined,
            nodeAttestor: {
              type: "x509pop",
              privateKeyPath: join(dir, "key.pem"),
              certificatePath: join(dir, "cert.pem"),
            },
            syncInterval: "500ms",
          });
          agents.push(agent);
          await agent.start();
          pids.push(agent.pid!);

          // The selectors SPIRE derived from the certificate: the alias's must be among them.
          let selectors: string[] = [];
          await waitFor(async () => {
            const a = (await cli.listAgents()).find((x) =>
              x.attestationType === "x509pop" &&
              x.selectors.includes(`x509pop:subject:cn:${c.id}`)
            );
            selectors = a?.selectors ?? [];
            return a !== undefined;
          }, { timeoutMs: 30_000, intervalMs: 200, what: `${c.id}'s agent attested` });
          assert.ok(
            selectors.includes(`x509pop:serialnumber:${signed.serialHex}`),
            `SPIRE's selectors of ${c.id}: ${selectors.join(", ")}; the alias says ` +
              `x509pop:serialnumber:${signed.serialHex}`,
          );
          // And so the robot's identity is issued.
          const src = await X509Source.create({
            address: `unix://${dir}/a/agent.sock`,
            spiffeId: robotSpiffeId(TD, c.id),
            timeoutMs: 30_000,
          });
          await src.close();
        });
      }
    } finally {
      for (const a of agents) await a.stop().catch(() => {});
      await server?.stop().catch(() => {});
      const spireLog = await Deno.readTextFile(`${tmp}/spire-server.log`).catch(() => "");
      await Deno.remove(tmp, { recursive: true }).catch(() => {});
      for (const pid of pids) {
        assert.equal(processStartTime(pid), undefined, `process ${pid} survived\n${spireLog}`);
      }
    }
  },
});
