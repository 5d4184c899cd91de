// Spawns the real CLI in an empty project dir (free ports, private socket dir): nothing runs
// there, so doctor must report failures with hints and exit 1.
import assert from "node:assert/strict";
import { fileURLToPath as fromFileUrl } from "node:url";
import { layoutEnv } from "../src/devenv/layout.ts";
import { freePorts } from "./helpers/ports.ts";

const MAIN = fromFileUrl(new URL("../main.ts", import.meta.url));
const CONFIG = fromFileUrl(new URL("../deno.json", import.meta.url));

async function doctor(args: string[]) {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-doctor-cli-" });
  try {
    const [spireServer, mqttPlain, mqttTls, http] = freePorts(4);
    const env: Record<string, string> = {
      NO_COLOR: "1",
      ...layoutEnv({ spireServer, mqttPlain, mqttTls, http }, { agentSocketDir: `${dir}/sockets` }),
    };
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--config", CONFIG, MAIN, "doctor", ...args],
      cwd: dir,
      env,
      stdout: "piped",
      stderr: "piped",
    }).output();
    const td = new TextDecoder();
    return { code: out.code, stdout: td.decode(out.stdout), stderr: td.decode(out.stderr) };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("doctor --json in an empty project reports failures with hints and exits 1", async () => {
  const r = await doctor(["--json"]);
  assert.equal(r.code, 1, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.deepEqual(Object.keys(j), ["checks", "summary"]);
  const failed = j.checks.filter((c: { status: string }) => c.status === "fail");
  assert.ok(failed.length >= 5, r.stdout);
  for (const c of failed) {
    assert.deepEqual(Object.keys(c), ["id", "group", "title", "status", "detail", "hint", "ms"]);
    assert.equal(typeof c.hint, "string", `${c.id} has no hint`);
    assert.ok(c.hint.length > 0);
  }
  const byId = Object.fromEntries(j.checks.map((c: { id: string }) => [c.id, c]));
  assert.equal(byId["spire-server.port"].status, "fail");
  assert.equal(byId["spire-agent.svid"].status, "skip");
  assert.equal(byId["spire-agent.svid"].detail, "skipped: spire-agent.socket failed");
  assert.equal(j.summary.crash, 0, r.stdout);
});

Deno.test("doctor --only bogus is a usage error (exit 2) listing the groups", async () => {
  const r = await doctor(["--only", "brokr"]);
  assert.equal(r.code, 2);
  assert.match(
    r.stderr,
    /unknown group 'brokr' \(did you mean 'broker'\?\); groups: tools, config/,
  );
  const b = await doctor(["--only", "bogus"]);
  assert.equal(b.code, 2);
});

Deno.test("doctor --only config prints one group in human form", async () => {
  const r = await doctor(["--only", "config"]);
  assert.equal(r.code, 1);
  assert.match(r.stdout, /^\[config\]\n✗ SPIRE server config\n/);
  assert.match(r.stdout, /\d+ ok, \d+ warnings, \d+ failed, \d+ skipped, 0 crashed in \d+ ms\n$/);
});
