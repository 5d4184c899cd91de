import assert from "node:assert/strict";
import * as http2 from "node:http2";
import { join } from "node:path";
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  frameMessage,
  GrpcChannel,
  GrpcDeframer,
  GrpcError,
  GrpcStatus,
} from "./grpc.ts";

/** A small deterministic PRNG (mulberry32), so a failing case can be replayed. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

Deno.test("GrpcDeframer reassembles messages from any chunking", () => {
  const rnd = prng(1);
  for (let round = 0; round < 200; round++) {
    const msgs = Array.from(
      { length: 1 + Math.floor(rnd() * 5) },
      () => Uint8Array.from({ length: Math.floor(rnd() * 300) }, () => Math.floor(rnd() * 256)),
    );
    const wire = concat(msgs.map(frameMessage));
    const d = new GrpcDeframer();
    const got: Uint8Array[] = [];
    for (let off = 0; off < wire.length;) {
      const n = Math.min(wire.length - off, 1 + Math.floor(rnd() * 40));
      got.push(...d.push(wire.subarray(off, off + n)));
      off += n;
    }
    assert.deepEqual(got, msgs, `round ${round}`);
    assert.equal(d.pending, 0);
  }
});

Deno.test("GrpcDeframer refuses an oversized or compressed message before buffering it", () => {
  const d = new GrpcDeframer(1024);
  // A 4 GiB length prefix: refused from the 5 header bytes, nothing allocated for the body.
  assert.throws(
    () => d.push(new Uint8Array([0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3])),
    (e: unknown) =>
      e instanceof GrpcError && e.code === GrpcStatus.RESOURCE_EXHAUSTED &&
      /larger than max \(4294967295 vs\. 1024\)/.test(e.details),
  );
  // Positive control: exactly at the limit is fine.
  const ok = new GrpcDeframer(1024).push(frameMessage(new Uint8Array(1024)));
  assert.equal(ok.length, 1);
  assert.equal(ok[0].length, 1024);
  assert.throws(
    () => new GrpcDeframer().push(new Uint8Array([1, 0, 0, 0, 1, 9])),
    (e: unknown) =>
      e instanceof GrpcError && e.code === GrpcStatus.INTERNAL && /compressed/.test(e.details),
  );
  assert.equal(new GrpcDeframer().maxMessageBytes, DEFAULT_MAX_MESSAGE_BYTES);
});

Deno.test("GrpcDeframer fuzz: random bytes give messages or a GrpcError, never more than given", () => {
  const rnd = prng(7);
  for (let round = 0; round < 2000; round++) {
    const bytes = Uint8Array.from(
      { length: Math.floor(rnd() * 64) },
      () => (rnd() < 0.5 ? 0 : Math.floor(rnd() * 256)),
    );
    const d = new GrpcDeframer(32);
    try {
      let total = 0;
      for (const m of d.push(bytes)) total += m.length + 5;
      assert.ok(total + d.pending <= bytes.length, `round ${round}`);
    } catch (e) {
      assert.ok(e instanceof GrpcError, `round ${round}: ${e}`);
    }
  }
});

/**
 * A plain node:http2 server on a unix socket whose handler answers as the test wants, to reach
 * the corners a gRPC server library never produces.
 */
async function withServer(
  handler: (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders) => void,
  fn: (channel: GrpcChannel, seen: http2.IncomingHttpHeaders[]) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-grpc-" });
  const path = join(dir, "s.sock");
  const seen: http2.IncomingHttpHeaders[] = [];
  const sessions = new Set<http2.ServerHttp2Session>();
  const server = http2.createServer();
  server.on("session", (s) => {
    sessions.add(s);
    s.on("close", () => sessions.delete(s));
  });
  server.on("stream", (stream, headers) => {
    seen.push(headers);
    stream.on("error", () => {}); // resets the tests cause on purpose
    handler(stream as http2.ServerHttp2Stream, headers);
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  const channel = new GrpcChannel({ kind: "unix", path });
  try {
    await fn(channel, seen);
  } finally {
    channel.close();
    for (const s of sessions) s.destroy();
    await new Promise((resolve) => server.close(resolve));
    await Deno.remove(dir, { recursive: true });
  }
}

const OK_HEADERS = { ":status": 200, "content-type": "application/grpc" };

async function rejectsCode(p: Promise<unknown>, code: number, details?: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof GrpcError, String(e));
    assert.equal(e.code, code, e.message);
    if (details) assert.match(e.details, details);
    return true;
  });
}

Deno.test("GrpcChannel sends gRPC's request headers and one framed message", async () => {
  await withServer((stream) => {
    const parts: Uint8Array[] = [];
    stream.on("data", (c: Uint8Array) => parts.push(c));
    stream.on("end", () => {
      const body = concat(parts);
      stream.respond(OK_HEADERS, { waitForTrailers: true });
      stream.on("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
      stream.end(frameMessage(body.subarray(5).reverse()));
    });
  }, async (channel, seen) => {
    const res = await channel.unary("/Svc/Echo", new Uint8Array([1, 2, 3]), { "x-k": "v" }, {
      timeoutMs: 5000,
    });
    assert.deepEqual([...res], [3, 2, 1]);
    const h = seen[0];
    assert.equal(h[":method"], "POST");
    assert.equal(h[":path"], "/Svc/Echo");
    assert.equal(h["content-type"], "application/grpc");
    assert.equal(h["te"], "trailers");
    assert.equal(h["x-k"], "v");
    assert.match(String(h["grpc-timeout"]), /^\d+m$/);
  });
});

Deno.test("GrpcChannel reads the status from trailers, trailers-only responses and HTTP", async () => {
  let mode = "";
  await withServer((stream) => {
    stream.on("data", () => {});
    if (mode === "trailers-only") {
      stream.respond({
        ...OK_HEADERS,
        "grpc-status": "7",
        "grpc-message": "no%20identity%20issued",
      }, { endStream: true });
    } else if (mode === "http503") {
      stream.respond({ ":status": 503 }, { endStream: true });
    } else if (mode === "html") {
      stream.respond({ ":status": 200, "content-type": "text/html" });
      stream.end("<html>");
    } else if (mode === "no-status") {
      stream.respond(OK_HEADERS, { waitForTrailers: true });
      stream.on("wantTrailers", () => stream.sendTrailers({ "x-other": "1" }));
      stream.end(frameMessage(new Uint8Array([1])));
    } else if (mode === "rst") {
      stream.respond(OK_HEADERS);
      stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
    } else if (mode === "truncated") {
      stream.respond(OK_HEADERS, { waitForTrailers: true });
      stream.on("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
      stream.end(frameMessage(new Uint8Array(10)).subarray(0, 8));
    } else if (mode === "two") {
      stream.respond(OK_HEADERS, { waitForTrailers: true });
      stream.on("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
      stream.end(concat([frameMessage(new Uint8Array([1])), frameMessage(new Uint8Array([2]))]));
    } else if (mode === "huge") {
      stream.respond(OK_HEADERS);
      stream.write(new Uint8Array([0, 0x7f, 0xff, 0xff, 0xff]));
    }
  }, async (channel) => {
    const call = () => channel.unary("/S/M", new Uint8Array(), {}, { timeoutMs: 5000 });
    mode = "trailers-only";
    await rejectsCode(call(), GrpcStatus.PERMISSION_DENIED, /^no identity issued$/);
    mode = "http503";
    await rejectsCode(call(), GrpcStatus.UNAVAILABLE, /HTTP status 503/);
    mode = "html";
    await rejectsCode(call(), GrpcStatus.UNKNOWN, /content-type 'text\/html'/);
    mode = "no-status";
    await rejectsCode(call(), GrpcStatus.UNKNOWN, /without grpc-status/);
    mode = "rst";
    // Deno 2.9's node:http2 exposes no rstCode on the client: a reset reads as a stream that
    // ended without a status.
    await rejectsCode(
      call(),
      GrpcStatus.UNAVAILABLE,
      /RST_STREAM code 7|ended without a status/,
    );
    mode = "truncated";
    await rejectsCode(call(), GrpcStatus.INTERNAL, /inside a message/);
    mode = "two";
    await rejectsCode(call(), GrpcStatus.UNIMPLEMENTED, /several response messages/);
    mode = "huge";
    await rejectsCode(call(), GrpcStatus.RESOURCE_EXHAUSTED, /larger than max/);
  });
});

Deno.test("GrpcChannel streams messages, then ends with the server's status", async () => {
  await withServer((stream) => {
    stream.on("data", () => {});
    stream.respond(OK_HEADERS, { waitForTrailers: true });
    stream.on("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
    // One message split across writes, then two in one write.
    const a = frameMessage(new Uint8Array([1, 1, 1]));
    stream.write(a.subarray(0, 2));
    setTimeout(() => {
      stream.write(a.subarray(2));
      stream.end(concat([frameMessage(new Uint8Array([2])), frameMessage(new Uint8Array())]));
    }, 10);
  }, async (channel) => {
    const got: number[][] = [];
    const err = await new Promise<GrpcError | undefined>((resolve) => {
      channel.call("/S/Stream", new Uint8Array(), {}, {
        onMessage: (m) => got.push([...m]),
        onEnd: resolve,
      });
    });
    assert.equal(err, undefined);
    assert.deepEqual(got, [[1, 1, 1], [2], []]);
  });
});

Deno.test("GrpcChannel: deadline, cancel and a dropped connection end the call", async () => {
  const open: http2.ServerHttp2Stream[] = [];
  await withServer((stream) => {
    stream.on("data", () => {});
    stream.respond(OK_HEADERS);
    stream.write(frameMessage(new Uint8Array([9])));
    open.push(stream); // never finished by the server
  }, async (channel) => {
    await rejectsCode(
      channel.unary("/S/M", new Uint8Array(), {}, { timeoutMs: 50 }),
      GrpcStatus.DEADLINE_EXCEEDED,
    );
    const ac = new AbortController();
    const got: number[] = [];
    const ended = new Promise<GrpcError | undefined>((resolve) => {
      channel.call("/S/M", new Uint8Array(), {}, {
        onMessage: (m) => {
          got.push(m[0]);
          ac.abort();
        },
        onEnd: resolve,
      }, { signal: ac.signal });
    });
    const cancelled = await ended;
    assert.equal(cancelled?.code, GrpcStatus.CANCELLED);
    assert.deepEqual(got, [9]);
    // The server side goes away while a stream is open: UNAVAILABLE, and the next call
    // reconnects (positive control: it gets its first message).
    const dropped = new Promise<GrpcError | undefined>((resolve) => {
      channel.call("/S/M", new Uint8Array(), {}, {
        onMessage: () => {
          for (const s of open) s.session?.destroy();
        },
        onEnd: resolve,
      });
    });
    const err = await dropped;
    assert.equal(err?.code, GrpcStatus.UNAVAILABLE, err?.message ?? "");
    // A call made while the dropped connection is still closing may fail too (UNAVAILABLE, as
    // with grpc-js; watchers retry); one of the next calls gets through on a new connection.
    const attempt = () =>
      new Promise<number | GrpcError | undefined>((resolve) => {
        const cancel = channel.call("/S/M", new Uint8Array(), {}, {
          onMessage: (m) => {
            resolve(m[0]);
            cancel();
          },
          onEnd: resolve,
        });
      });
    let again = await attempt();
    for (let i = 0; i < 3 && again instanceof GrpcError; i++) {
      assert.equal(again.code, GrpcStatus.UNAVAILABLE, again.message);
      again = await attempt();
    }
    assert.equal(again, 9);
  });
});

Deno.test("GrpcChannel names the cause when nothing listens", async () => {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-grpc-" });
  const channel = new GrpcChannel({ kind: "unix", path: join(dir, "missing.sock") });
  try {
    await rejectsCode(
      channel.unary("/S/M", new Uint8Array(), {}, { timeoutMs: 5000 }),
      GrpcStatus.UNAVAILABLE,
      /ENOENT/,
    );
  } finally {
    channel.close();
    await Deno.remove(dir, { recursive: true });
  }
  const closed = new GrpcChannel({ kind: "unix", path: "/nonexistent.sock" });
  closed.close();
  await rejectsCode(closed.unary("/S/M", new Uint8Array(), {}), GrpcStatus.CANCELLED, /closed/);
});
