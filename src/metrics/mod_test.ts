import assert from "node:assert/strict";
import {
  checkLoopbackHostHeader,
  epochSeconds,
  metricsResponse,
  Serial,
  serveMetrics,
} from "./mod.ts";

const page = { render: () => Promise.resolve("up 1\n") };

Deno.test("epochSeconds: RFC 3339, Date and ms; undefined for missing or bad values", () => {
  assert.equal(
    epochSeconds("2026-12-01T12:00:00.500Z"),
    Date.parse("2026-12-01T12:00:00.500Z") / 1000,
  );
  assert.equal(epochSeconds(new Date(1500)), 1.5);
  assert.equal(epochSeconds(2000), 2);
  assert.equal(epochSeconds(null), undefined);
  assert.equal(epochSeconds(undefined), undefined);
  assert.equal(epochSeconds("yesterday"), undefined);
});

Deno.test("checkLoopbackHostHeader: loopback names with this port or none; anything else refused", () => {
  for (const h of ["127.0.0.1:9464", "localhost:9464", "[::1]:9464", "127.0.0.1", "LOCALHOST"]) {
    assert.equal(checkLoopbackHostHeader(h, 9464), undefined, h);
  }
  for (
    const h of [
      null,
      "",
      "evil.example:9464",
      "evil.example",
      "127.0.0.1:80",
      "10.0.0.1:9464",
      "127.0.0.1:9464:1",
      "[::1",
      "localhost.evil.example:9464",
    ]
  ) {
    assert.match(checkLoopbackHostHeader(h, 9464) ?? "accepted", /^Host/, String(h));
  }
});

Deno.test("Serial runs jobs one at a time, in order, past a failure", async () => {
  const s = new Serial();
  const log: string[] = [];
  const job = (name: string, fail = false) => async () => {
    log.push(`${name}:start`);
    await Promise.resolve();
    log.push(`${name}:end`);
    if (fail) throw new Error(name);
    return name;
  };
  const r = await Promise.allSettled([s.run(job("a")), s.run(job("b", true)), s.run(job("c"))]);
  assert.deepEqual(log, ["a:start", "a:end", "b:start", "b:end", "c:start", "c:end"]);
  assert.equal(r[1].status, "rejected");
  assert.deepEqual(r[2], { status: "fulfilled", value: "c" });
});

Deno.test("metricsResponse: GET and HEAD, 405 otherwise, 500 on a failing render", async () => {
  const get = await metricsResponse(new Request("http://x/metrics"), page);
  assert.equal(get.status, 200);
  assert.equal(await get.text(), "up 1\n");
  const head = await metricsResponse(new Request("http://x/metrics", { method: "HEAD" }), page);
  assert.equal(head.status, 200);
  assert.equal(await head.text(), "");
  const post = await metricsResponse(new Request("http://x/metrics", { method: "POST" }), page);
  assert.equal(post.status, 405);
  assert.equal(post.headers.get("allow"), "GET, HEAD");
  await post.body?.cancel();
  const bad = await metricsResponse(new Request("http://x/metrics"), {
    render: () => Promise.reject(new Error("boom")),
  });
  assert.equal(bad.status, 500);
  assert.equal(await bad.text(), "metrics: boom\n");
});

Deno.test("serveMetrics: loopback only, /metrics only", async () => {
  assert.throws(
    () => serveMetrics(page, { hostname: "0.0.0.0", port: 0 }),
    /metrics address: expected a loopback host .* got "0.0.0.0"/,
  );
  const srv = serveMetrics(page, { hostname: "127.0.0.1", port: 0 });
  try {
    assert.match(srv.url, /^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    const ok = await fetch(srv.url);
    assert.equal(ok.status, 200);
    assert.equal(await ok.text(), "up 1\n");
    const other = await fetch(srv.url.replace("/metrics", "/"));
    assert.equal(other.status, 404);
    await other.body?.cancel();
    // DNS rebinding: the same request with a foreign Host is refused; the positive control is
    // the same raw request with the listener's own Host.
    const raw = async (host: string) => {
      const c = await Deno.connect({ hostname: "127.0.0.1", port: srv.addr.port });
      await c.write(new TextEncoder().encode(
        `GET /metrics HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`,
      ));
      return new TextDecoder().decode(await new Response(c.readable).arrayBuffer());
    };
    const own = await raw(`127.0.0.1:${srv.addr.port}`);
    assert.match(own, /^HTTP\/1\.1 200/);
    assert.match(own, /up 1/);
    const rebound = await raw(`evil.example:${srv.addr.port}`);
    assert.match(rebound, /^HTTP\/1\.1 403/);
    assert.doesNotMatch(rebound, /up 1/);
  } finally {
    await srv.close();
  }
});
