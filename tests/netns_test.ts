/**
 * The multi-host test network (tests/helpers/netns.ts) with real namespaces: a TCP listener on
 * the control host's end of the link is reached from inside the robot host; with the cable
 * pulled it is not (and the listener sees nothing); plugged back, it is again. A test that fails
 * leaves no namespace or link behind (the unload hook), and close() leaves none either.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { TEST_RANGE, TestNetwork } from "./helpers/netns.ts";
import { freePort } from "./helpers/ports.ts";

/** One TCP connect from inside the robot host, within 2 s: exit 0 when it connected. */
async function reach(exec: string[], host: string, port: number): Promise<boolean> {
  const r = await new Deno.Command(exec[0], {
    args: [...exec.slice(1), "timeout", "2", "bash", "-c", `exec 3<>/dev/tcp/${host}/${port}`],
    stdout: "null",
    stderr: "null",
  }).output();
  return r.code === 0;
}

Deno.test("netns: the control host's address is reached from a robot host; a pulled cable cuts it", async () => {
  const net = await TestNetwork.create();
  let listener: Deno.Listener | undefined;
  try {
    const h = await net.addHost();
    assert.match(h.controlAddress, /^10\.203\.\d+\.1$/);
    assert.match(h.address, /^10\.203\.\d+\.2$/);
    assert.ok(TEST_RANGE === "10.203.0.0/16");
    const port = freePort();
    listener = Deno.listen({ hostname: h.controlAddress, port });
    let accepted = 0;
    const l = listener;
    (async () => {
      for await (const c of l) {
        accepted++;
        c.close();
      }
    })().catch(() => {});

    // The robot host sees its own address and nothing but loopback besides.
    const addrs = new TextDecoder().decode(
      (await new Deno.Command(h.exec[0], {
        args: [...h.exec.slice(1), "ip", "-o", "-4", "addr"],
        stdout: "piped",
      }).output()).stdout,
    );
    assert.match(addrs, new RegExp(`inet ${h.address.replace(/\./g, "\\.")}/24`));
    assert.match(addrs, /inet 127\.0\.0\.1\/8/);
    // Like a real host, it has cgroup2 at /sys/fs/cgroup (agents there contain their tasks).
    const mounts = new TextDecoder().decode(
      (await new Deno.Command(h.exec[0], {
        args: [...h.exec.slice(1), "cat", "/proc/self/mountinfo"],
        stdout: "piped",
      }).output()).stdout,
    );
    assert.match(mounts, / \/sys\/fs\/cgroup rw[^ ]* - cgroup2 /);

    assert.equal(
      await reach(h.exec, h.controlAddress, port),
      true,
      "not reachable with the cable in",
    );
    const afterFirst = accepted;
    assert.ok(afterFirst >= 1 || (await waitAccept(() => accepted, 1)), "the listener saw nothing");

    await net.pullCable(h);
    assert.equal(
      await reach(h.exec, h.controlAddress, port),
      false,
      "reachable with the cable pulled",
    );
    const whilePulled = accepted;

    await net.plugCable(h);
    assert.equal(
      await reach(h.exec, h.controlAddress, port),
      true,
      "not reachable after plugging back",
    );
    assert.ok(await waitAccept(() => accepted, whilePulled + 1));
    // Loopback of the control host is not the robot's: 127.0.0.1 inside is the robot's own.
    assert.equal(await reach(h.exec, "127.0.0.1", port), false);
  } finally {
    listener?.close();
    await net.close();
  }
  assert.deepEqual(await TestNetwork.leftovers(), []);
});

async function waitAccept(get: () => number, n: number): Promise<boolean> {
  const { waitFor } = await import("../src/process/mod.ts");
  await waitFor(() => get() >= n, { timeoutMs: 3000, intervalMs: 20, what: `${n} accepted` });
  return true;
}

Deno.test("netns: a failing test leaves no namespace or link behind", async () => {
  const fixture = fileURLToPath(new URL("./fixtures/netns_failing.ts", import.meta.url));
  const r = await new Deno.Command(Deno.execPath(), {
    args: ["test", "-A", fixture],
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).output();
  const out = new TextDecoder().decode(r.stdout) + new TextDecoder().decode(r.stderr);
  assert.notEqual(r.code, 0, "the fixture was meant to fail");
  assert.match(out, /deliberate failure/);
  const names = /NETNS-NAMES (\S+) (\S+) (\S+)/.exec(out);
  assert.ok(names, `the fixture printed no names:\n${out}`);
  const [, ns, hostLink, nsLink] = names;
  const list = new TextDecoder().decode(
    (await new Deno.Command("ip", { args: ["netns", "list"], stdout: "piped" }).output()).stdout,
  );
  assert.ok(!list.split("\n").some((l) => l.startsWith(`${ns} `) || l === ns), `${ns} survived`);
  const links = new TextDecoder().decode(
    (await new Deno.Command("ip", { args: ["-o", "link", "show"], stdout: "piped" }).output())
      .stdout,
  );
  assert.ok(
    !links.includes(`${hostLink}@`) && !links.includes(`${hostLink}:`),
    `${hostLink} survived`,
  );
  assert.ok(!links.includes(nsLink), `${nsLink} survived`);
});
