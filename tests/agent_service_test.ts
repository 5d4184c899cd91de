/**
 * `k8s4r agent service`: the real CLI prints and installs the systemd unit, and systemd's own
 * checker, `systemd-analyze verify`, accepts it without a single complaint. Positive control: the
 * same checker does complain about a unit with a bad value and a missing executable, so silence
 * means "accepted", not "not checked".
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { startCli } from "./helpers/cli.ts";

async function verify(unitFile: string): Promise<{ code: number; out: string }> {
  const r = await new Deno.Command("systemd-analyze", {
    args: ["verify", unitFile],
    stdout: "piped",
    stderr: "piped",
  }).output().catch((err) => {
    throw new Error(`systemd-analyze is needed for this test (apt-get install systemd): ${err}`);
  });
  const td = new TextDecoder();
  return { code: r.code, out: (td.decode(r.stdout) + td.decode(r.stderr)).trim() };
}

Deno.test("agent service: the hardened unit passes systemd-analyze verify; --install writes it 0644", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-unit-" });
  try {
    const printed = startCli(["agent", "service"]);
    assert.equal(await printed.exited, 0, printed.stderr());
    const unit = printed.stdout();
    for (
      const line of [
        "Restart=always",
        "Environment=DENO_V8_FLAGS=--max-semi-space-size=1,--lite-mode",
        "NoNewPrivileges=yes",
        "StateDirectory=k8s4r",
        "RuntimeDirectory=k8s4r",
        "ConfigurationDirectory=k8s4r",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "KillMode=mixed",
      ]
    ) assert.ok(unit.split("\n").includes(line), `missing ${line}:\n${unit}`);
    assert.match(
      unit,
      /^ExecStart=\/\S+ run --no-code-cache --node-modules-dir=manual -A --config \/\S+\/deno\.json \/\S+\/main\.ts agent$/m,
    );
    // V8 writes and runs machine code: W^X would kill the agent.
    assert.doesNotMatch(unit, /MemoryDenyWriteExecute/);

    const file = join(dir, "k8s4r-agent.service");
    const inst = startCli([
      "agent",
      "service",
      "--install",
      "--unit-file",
      file,
      "--data-dir",
      join(dir, "robot"),
    ]);
    assert.equal(await inst.exited, 0, inst.stderr());
    assert.match(inst.stdout(), /systemctl daemon-reload && systemctl enable --now k8s4r-agent/);
    assert.equal((await Deno.stat(file)).mode! & 0o777, 0o644);
    const installed = await Deno.readTextFile(file);
    assert.match(installed, new RegExp(`agent --data-dir ${join(dir, "robot")}\\n`));
    assert.match(installed, new RegExp(`ReadWritePaths=${join(dir, "robot")}\\n`));
    assert.deepEqual(await verify(file), { code: 0, out: "" });
    const plain = join(dir, "plain", "k8s4r-agent.service");
    await Deno.mkdir(join(dir, "plain"));
    await Deno.writeTextFile(plain, unit);
    assert.deepEqual(await verify(plain), { code: 0, out: "" });

    // Positive control: the checker reports a bad value and a missing executable.
    const bad = join(dir, "bad", "k8s4r-agent.service");
    await Deno.mkdir(join(dir, "bad"));
    await Deno.writeTextFile(
      bad,
      unit.replace("ProtectClock=yes", "ProtectClock=maybe").replace(
        /^ExecStart=\S+/m,
        "ExecStart=/nonexistent/k8s4r",
      ),
    );
    const b = await verify(bad);
    assert.notEqual(b.code, 0);
    assert.match(b.out, /Failed to parse boolean value, ignoring: maybe/);
    assert.match(b.out, /\/nonexistent\/k8s4r is not executable/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
