import assert from "node:assert/strict";
import { RecordingRunner } from "../process/mod.ts";
import { openLogin } from "./dashboard_open.ts";

const TOKEN = "Qx7".padEnd(43, "k");
const URL_ = `https://localhost:8090/dashboard/login?token=${TOKEN}`;

function io(runner: RecordingRunner) {
  let err = "";
  return {
    io: {
      runner,
      env: { DISPLAY: ":0" },
      stderr: { write: (s: string) => void (err += s) },
      signal: new AbortController().signal,
    },
    err: () => err,
  };
}

Deno.test("dashboard: the login URL's token is never on a spawned command line", async () => {
  const seen: { path: string; mode: number; dirMode: number; html: string }[] = [];
  const runner = new RecordingRunner((cmd, args) => {
    assert.equal(cmd, "xdg-open");
    // The opener gets a file: private, in a private directory, and it leads to the URL.
    const path = args[0];
    const st = Deno.statSync(path);
    const dir = Deno.statSync(path.slice(0, path.lastIndexOf("/")));
    seen.push({
      path,
      mode: st.mode! & 0o777,
      dirMode: dir.mode! & 0o777,
      html: Deno.readTextFileSync(path),
    });
    return {};
  });
  const t = io(runner);
  const r = await openLogin(URL_, t.io, {
    expiresAt: Date.now() + 60_000,
    state: () => Promise.resolve("used"),
  });
  // Positive control: the opener was called, once, and says it opened.
  assert.equal(runner.calls.length, 1, JSON.stringify(runner.calls));
  assert.equal(r.opened, true);
  for (const c of runner.calls) {
    assert.ok(!c.args.join(" ").includes(TOKEN), `token on the argv: ${c.cmd} ${c.args}`);
    assert.ok(!c.cmd.includes(TOKEN));
    assert.ok(!JSON.stringify(c.opts ?? {}).includes(TOKEN), "nor in its env or stdin");
  }
  assert.equal(seen.length, 1);
  assert.equal(seen[0].mode, 0o600);
  assert.equal(seen[0].dirMode, 0o700);
  assert.match(seen[0].path, /\.html$/);
  assert.ok(seen[0].html.includes(URL_.replace("&", "&amp;")), seen[0].html);
  // ... and removed once the login was used.
  assert.throws(() => Deno.statSync(seen[0].path), Deno.errors.NotFound);
  assert.throws(
    () => Deno.statSync(seen[0].path.slice(0, seen[0].path.lastIndexOf("/"))),
    Deno.errors.NotFound,
  );
});

Deno.test("dashboard: the redirect page is removed when xdg-open fails, the login expires, or on Ctrl-C", async () => {
  // xdg-open fails: said, and nothing is left behind.
  let path = "";
  const failing = new RecordingRunner((_c, args) => {
    path = args[0];
    return { code: 3, stderr: "no method available for opening\n" };
  });
  const a = io(failing);
  const r = await openLogin(URL_, a.io, {
    expiresAt: Date.now() + 60_000,
    state: () => Promise.resolve("pending"),
  });
  assert.equal(r.opened, false);
  assert.match(a.err(), /could not open a browser \(xdg-open: no method available/);
  assert.throws(() => Deno.statSync(path), Deno.errors.NotFound);

  // Never used: the command waits until the login's expiry, then removes the page.
  const b = io(new RecordingRunner((_c, args) => ((path = args[0]), {})));
  let polls = 0;
  const late = await openLogin(URL_, b.io, {
    expiresAt: Date.now() + 200,
    pollMs: 20,
    state: () => Promise.resolve(++polls > 1000 ? "used" : "pending"),
  });
  assert.equal(late.state, "expired");
  assert.ok(polls >= 2, `polled ${polls} times`);
  assert.match(b.err(), /the login was not used \(expired\)/);
  assert.throws(() => Deno.statSync(path), Deno.errors.NotFound);

  // Interrupted while waiting.
  const ac = new AbortController();
  const c = io(new RecordingRunner((_c, args) => ((path = args[0]), {})));
  const waiting = openLogin(URL_, { ...c.io, signal: ac.signal }, {
    expiresAt: Date.now() + 60_000,
    pollMs: 20,
    state: () => {
      ac.abort();
      return Promise.resolve("pending");
    },
  });
  const stopped = await waiting;
  assert.equal(stopped.state, undefined);
  assert.throws(() => Deno.statSync(path), Deno.errors.NotFound);
});
