import assert from "node:assert/strict";
import { findHaproxy, parseShowStat, parseShowStatRows, renderHaproxyConfig } from "./haproxy.ts";

const CONFIG = {
  frontend: { address: "127.0.0.1", port: 8081 },
  backends: [
    { name: "spire-server", address: "127.0.0.1", port: 8181 },
    { name: "spire-server-2", address: "127.0.0.1", port: 8182 },
  ],
  statsSocket: "/p/.dev-env/haproxy/stats.sock",
};

Deno.test("haproxy config: TCP passthrough to both servers, 1 s TLS checks, sessions cut when one is down", () => {
  const cfg = renderHaproxyConfig(CONFIG);
  assert.ok(cfg.includes("\n  mode tcp\n"));
  assert.ok(cfg.includes("\n  bind 127.0.0.1:8081\n"));
  // A TLS handshake, not a bare connect (which the kernel completes for a frozen process).
  const check = "check check-ssl verify none check-alpn h2\n";
  assert.ok(cfg.includes(`server spire-server 127.0.0.1:8181 ${check}`), cfg);
  assert.ok(cfg.includes(`server spire-server-2 127.0.0.1:8182 ${check}`), cfg);
  // The agents' traffic itself is passed through: haproxy never terminates their TLS.
  assert.doesNotMatch(cfg, / ssl( |$)/m);
  assert.match(cfg, /inter 1s fall 2 rise 1 on-marked-down shutdown-sessions/);
  assert.match(cfg, /stats socket \/p\/\.dev-env\/haproxy\/stats\.sock mode 600/);
  assert.doesNotMatch(cfg, /httpchk/, "a /ready check would drop both servers in a DB outage");
});

Deno.test("the real haproxy accepts the rendered config (haproxy -c)", async () => {
  const bin = findHaproxy(Deno.env.toObject());
  assert.ok(bin, "haproxy is not installed (apt-get install -y haproxy)");
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-haproxy-" });
  try {
    await Deno.writeTextFile(
      `${dir}/h.cfg`,
      renderHaproxyConfig({ ...CONFIG, statsSocket: `${dir}/s.sock` }),
    );
    const out = await new Deno.Command(bin, { args: ["-c", "-f", `${dir}/h.cfg`] }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, text);
    await Deno.writeTextFile(`${dir}/bad.cfg`, "backend x\n  server a 127.0.0.1:1 chek\n");
    const bad = await new Deno.Command(bin, { args: ["-c", "-f", `${dir}/bad.cfg`] }).output();
    assert.notEqual(bad.code, 0, "haproxy -c accepts anything: the check above proves nothing");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("parseShowStat: the SPIRE backend's servers and their state", () => {
  const csv = [
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight",
    "spire,FRONTEND,,,0,1,,1,0,0,0,0,0,,,,,OPEN,",
    "spire_servers,spire-server,0,0,0,1,,1,0,0,,0,,0,0,0,0,DOWN,1",
    "spire_servers,spire-server-2,0,0,1,1,,1,0,0,,0,,0,0,0,0,UP,1",
    "spire_servers,BACKEND,0,0,1,1,,1,0,0,0,0,,0,0,0,0,UP,1",
    "",
  ].join("\n");
  assert.deepEqual(
    [...parseShowStat(csv)],
    [["spire-server", "DOWN"], ["spire-server-2", "UP"]],
  );
  assert.equal(parseShowStat("garbage").size, 0);
  assert.deepEqual(parseShowStatRows(csv).get("spire-server-2"), { status: "UP", sessions: 1 });
});
