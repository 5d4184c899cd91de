import assert from "node:assert/strict";
import { join } from "node:path";
import { upTopic } from "../fleet/topics.ts";
import { encode, now, PROTOCOL_VERSION } from "../mqtt/messages.ts";
import { Outbox, OUTBOX_FILE, type OutboxOptions } from "./outbox.ts";
import { fillDisk, PAGE, withTmpfs } from "./testing/tmpfs.ts";

const ROBOT = "robot-001";

function heartbeat(seq: number): [topic: string, payload: Uint8Array] {
  return [
    upTopic(ROBOT, "heartbeat"),
    encode({
      v: PROTOCOL_VERSION,
      type: "heartbeat",
      robotId: ROBOT,
      ts: now(),
      seq,
      bootId: "boot-1",
      svidExpiresAt: now(),
    }),
  ];
}

function result(taskId: string, stdout = ""): [topic: string, payload: Uint8Array] {
  return [
    upTopic(ROBOT, "task"),
    encode({
      v: PROTOCOL_VERSION,
      type: "task-status",
      robotId: ROBOT,
      ts: now(),
      taskId,
      state: "done",
      exitCode: 0,
      stdout,
    }),
  ];
}

async function withDir(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-outbox-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const open = (dir: string, more: Partial<OutboxOptions> = {}) =>
  Outbox.open({ stateDir: dir, robotId: ROBOT, maxMessages: 1000, maxBytes: 1 << 20, ...more });

const describe = (box: { recovered: { kind: string; message: unknown }[] }) =>
  box.recovered.map((e) => {
    const m = e.message as { taskId?: string; seq?: number };
    return e.kind === "result" ? `r:${m.taskId}` : `h:${m.seq}`;
  });

Deno.test("outbox: what is not acknowledged survives a restart, in order, byte for byte", async () => {
  await withDir(async (dir) => {
    const box = await open(dir);
    const a = await box.add("result", ...result("a"));
    await box.add("heartbeat", ...heartbeat(1));
    const b = await box.add("result", ...result("b", "out\u0000é"));
    await box.add("heartbeat", ...heartbeat(2));
    box.remove(a!.seq); // acknowledged
    await box.add("result", ...result("c"));
    // No close(): a crash. Everything `add` resolved is on disk.
    const again = await open(dir);
    assert.deepEqual(describe(again), ["h:1", "r:b", "h:2", "r:c"]);
    assert.deepEqual(again.recovered[1].payload, b!.payload);
    assert.equal(again.stats.corrupt, 0);
    // New entries continue after the old seqs.
    const d = await again.add("result", ...result("d"));
    assert.ok(d!.seq > again.recovered[3].seq);
    await box.close();
    await again.close();
  });
});

Deno.test("outbox: bounded; the oldest heartbeats go first, results never", async () => {
  await withDir(async (dir) => {
    const logs: string[] = [];
    const box = await open(dir, { maxMessages: 4, log: (e) => logs.push(e) });
    const h1 = await box.add("heartbeat", ...heartbeat(1));
    await box.add("result", ...result("a"));
    await box.add("heartbeat", ...heartbeat(2));
    await box.add("result", ...result("b"));
    assert.equal(box.stats.entries, 4);
    // Full: the next result pushes out the OLDEST heartbeat.
    await box.add("result", ...result("c"));
    assert.ok(h1!.dropped.aborted, "the dropped heartbeat's sender is told");
    assert.deepEqual([box.stats.heartbeats, box.stats.results], [1, 3]);
    // A new heartbeat pushes out the older heartbeat.
    await box.add("heartbeat", ...heartbeat(3));
    await box.add("result", ...result("d")); // drops h3: results only now
    assert.deepEqual([box.stats.heartbeats, box.stats.results], [0, 4]);
    assert.equal(box.resultsFull, true);
    // Results alone fill it: a heartbeat is not queued, a result still is (beyond the bound).
    assert.equal(await box.add("heartbeat", ...heartbeat(4)), undefined);
    const e = await box.add("result", ...result("e"));
    assert.ok(e);
    assert.equal(box.stats.results, 5);
    assert.equal(box.stats.overLimit, 1);
    assert.equal(box.stats.droppedHeartbeats, 4);
    assert.ok(logs.includes("outbox.dropping_heartbeats"));
    assert.ok(logs.includes("outbox.over_limit"));
    const again = await open(dir, { maxMessages: 4 });
    assert.deepEqual(describe(again), ["r:a", "r:b", "r:c", "r:d", "r:e"]);
    await box.close();
    await again.close();
  });
});

Deno.test("outbox: bounded in bytes too", async () => {
  await withDir(async (dir) => {
    const big = "x".repeat(4500);
    const box = await open(dir, { maxBytes: 10_000 });
    for (let i = 1; i <= 10; i++) await box.add("heartbeat", ...heartbeat(i));
    await box.add("result", ...result("a", big));
    await box.add("result", ...result("b", big));
    assert.ok(box.stats.bytes <= 10_000, `${box.stats.bytes} bytes`);
    assert.equal(box.stats.results, 2);
    const again = await open(dir, { maxBytes: 10_000 });
    const kept = describe(again);
    assert.deepEqual(kept.filter((k) => k.startsWith("r:")), ["r:a", "r:b"]);
    // The heartbeats that are left are the newest ones.
    const hs = kept.filter((k) => k.startsWith("h:")).map((k) => Number(k.slice(2)));
    assert.ok(hs.length > 0 && hs.length < 10);
    assert.deepEqual(hs, Array.from({ length: hs.length }, (_, i) => 10 - hs.length + 1 + i));
    await box.close();
    await again.close();
  });
});

Deno.test("outbox: a torn last record and damaged lines are counted, the rest kept", async () => {
  await withDir(async (dir) => {
    const box = await open(dir);
    await box.add("result", ...result("a"));
    await box.add("result", ...result("b"));
    await box.close();
    const file = join(dir, OUTBOX_FILE);
    const lines = (await Deno.readTextFile(file)).split("\n").filter((l) => l);
    // A crash in the middle of an append: half a record, no newline.
    const torn = lines[1].slice(0, 40);
    // A valid JSON line with a message the server would refuse; bytes that are not UTF-8.
    const refused = lines[1].replace('"state":"done"', '"state":"bogus"');
    await Deno.writeFile(
      file,
      new TextEncoder().encode(
        `${lines[0]}\n${refused}\n\xff\xfe garbage\n${lines[1]}\n${torn}`,
      ),
    );
    const logs: { e: string; f: Record<string, unknown> }[] = [];
    const again = await open(dir, { log: (e, f) => logs.push({ e, f }) });
    assert.deepEqual(describe(again), ["r:a", "r:b"]);
    assert.equal(again.stats.corrupt, 3);
    const l = logs.find((x) => x.e === "outbox.corrupt_records");
    assert.ok(l, JSON.stringify(logs));
    assert.equal(l.f.count, 3);
    // It keeps working, and the damage is gone from the rewritten file.
    await again.add("result", ...result("c"));
    await again.close();
    const third = await open(dir);
    assert.deepEqual(describe(third), ["r:a", "r:b", "r:c"]);
    assert.equal(third.stats.corrupt, 0);
    await third.close();
  });
});

Deno.test("outbox: an empty or entirely unreadable file does not stop the agent", async () => {
  await withDir(async (dir) => {
    await Deno.writeFile(join(dir, OUTBOX_FILE), new Uint8Array(1000).fill(0));
    const box = await open(dir);
    assert.equal(box.recovered.length, 0);
    assert.equal(box.stats.corrupt, 1);
    assert.ok(await box.add("result", ...result("a")));
    await box.close();
  });
});

Deno.test("outbox: acknowledgements are compacted away", async () => {
  await withDir(async (dir) => {
    const box = await open(dir);
    for (let i = 1; i <= 2000; i++) {
      const e = await box.add("heartbeat", ...heartbeat(i));
      box.remove(e!.seq);
    }
    await box.add("result", ...result("kept"));
    await box.close();
    const size = (await Deno.stat(join(dir, OUTBOX_FILE))).size;
    assert.ok(size < 200_000, `${size} bytes for one live entry`);
    const again = await open(dir);
    assert.deepEqual(describe(again), ["r:kept"]);
    await again.close();
  });
});

Deno.test("outbox: heartbeats dropped at a start whose rewrite fails (full disk) do not come back at the next start", async () => {
  await withTmpfs(8 * PAGE, async (mnt) => {
    const dir = join(mnt, "state");
    const first = await open(dir);
    for (let i = 1; i <= 10; i++) await first.add("heartbeat", ...heartbeat(i));
    await first.close();
    const size = (await Deno.stat(join(dir, OUTBOX_FILE))).size;
    assert.ok(size < PAGE - 400, `room for the deletions in the file's last page (${size})`);
    const disk = await fillDisk(mnt);
    try {
      assert.ok(disk.bytes > 0, "the filler took the rest of the tmpfs");
      // Control: a new file (the rewrite) cannot be made on this disk.
      await assert.rejects(
        Deno.writeTextFile(join(dir, "probe"), "x"),
        /No space left|os error 28/,
      );
      await Deno.remove(join(dir, "probe")).catch(() => {});
      // Today's bound is 4: the start drops h1..h6, and its rewrite fails.
      const logs: { event: string; what?: unknown }[] = [];
      const second = await open(dir, {
        maxMessages: 4,
        log: (event, f) => logs.push({ event, what: (f as { what?: unknown })?.what }),
      });
      assert.ok(
        logs.some((l) => l.event === "outbox.write_failed" && l.what === "rewrite at open"),
        JSON.stringify(logs),
      );
      assert.deepEqual(describe(second), ["h:7", "h:8", "h:9", "h:10"]);
      for (const e of second.recovered) second.remove(e.seq); // sent and acknowledged
      await second.close();
    } finally {
      await disk.free();
    }
    const third = await open(dir);
    assert.deepEqual(describe(third), [], "nothing is left to send: h1..h6 were dropped");
    await third.close();
  });
});

Deno.test("outbox: a result queued after a start whose rewrite fails (full disk) survives a torn last line the previous run left", async () => {
  for (const torn of [false, true]) {
    await withTmpfs(8 * PAGE, async (mnt) => {
      const dir = join(mnt, "state");
      const file = join(dir, OUTBOX_FILE);
      const first = await open(dir);
      await first.add("result", ...result("a"));
      await first.add("result", ...result("b"));
      await first.close();
      // A crash in the middle of an append: half a record, no newline (control: none).
      if (torn) {
        const line = (await Deno.readTextFile(file)).split("\n")[0];
        await Deno.writeTextFile(file, line.slice(0, 40), { append: true });
      }
      const disk = await fillDisk(mnt);
      try {
        assert.ok(disk.bytes > 0, "the filler took the rest of the tmpfs");
        const logs: string[] = [];
        const second = await open(dir, {
          log: (event, f) => logs.push(`${event} ${(f as { what?: unknown }).what}`),
        });
        assert.ok(logs.includes("outbox.write_failed rewrite at open"), JSON.stringify(logs));
        assert.deepEqual(describe(second), ["r:a", "r:b"]);
        const c = await second.add("result", ...result("c"));
        assert.equal(c?.written, true, `torn=${torn}: r:c is on disk (it fits the last page)`);
        await second.close();
      } finally {
        await disk.free();
      }
      const third = await open(dir);
      assert.deepEqual(describe(third), ["r:a", "r:b", "r:c"], `torn=${torn}`);
      await third.close();
    });
  }
});

Deno.test("outbox: a result queued while the file is compacted counts as on disk only once its own append succeeded", async () => {
  // Fault injection in-process: the compaction's rename waits for the test (so that a result is
  // queued while it runs), and the append after it fails like a full disk. Control: the same
  // without the failure.
  for (const fail of [false, true]) {
    await withDir(async (dir) => {
      const box = await open(dir);
      const entries = await Promise.all(
        Array.from({ length: 300 }, (_, i) => box.add("heartbeat", ...heartbeat(i + 1))),
      );
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      let atRename!: () => void;
      const renaming = new Promise<void>((r) => (atRename = r));
      let failWrites = false;
      const rename = Deno.rename;
      const write = Deno.FsFile.prototype.write;
      Deno.rename = async (from: string | URL, to: string | URL) => {
        if (String(to).endsWith(OUTBOX_FILE)) {
          atRename();
          await gate;
        }
        return rename(from, to);
      };
      Deno.FsFile.prototype.write = function (this: Deno.FsFile, p: Uint8Array) {
        if (failWrites) return Promise.reject(new Error("No space left on device (os error 28)"));
        return write.call(this, p);
      };
      try {
        for (const e of entries) box.remove(e!.seq); // acknowledged: the file is mostly dead now
        await renaming;
        const queued = box.add("result", ...result("x"));
        failWrites = fail;
        release();
        const x = await queued;
        failWrites = false;
        assert.equal(x?.written, !fail, `fail=${fail}: written says whether r:x is on disk`);
      } finally {
        Deno.rename = rename;
        Deno.FsFile.prototype.write = write;
        release();
      }
      await box.close(); // the last try writes r:x
      const again = await open(dir);
      assert.deepEqual(describe(again), ["r:x"], `fail=${fail}`);
      await again.close();
    });
  }
});
