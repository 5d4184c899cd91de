import assert from "node:assert/strict";
import { join } from "node:path";
import { TASK_IDS_FILE, TaskIdStore } from "./task_ids.ts";

const DAY = 86_400_000;
const WINDOW = 7 * DAY + 300_000;

async function withDir(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-ids-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function store(dir: string, clock: () => number, more: { maxIds?: number } = {}) {
  return new TaskIdStore({ stateDir: dir, windowMs: WINDOW, clock, ...more });
}

Deno.test("task ids: a claimed id is seen again, also after a restart; the file is 0600", async () => {
  await withDir(async (dir) => {
    const t0 = Date.parse("2026-01-01T00:00:00Z");
    const s = store(dir, () => t0);
    assert.equal(await s.claim("A", t0), true);
    assert.equal(await s.claim("A", t0), false);
    await s.close();
    const again = store(dir, () => t0 + 1000);
    assert.equal(await again.claim("A", t0), false);
    assert.equal(await again.claim("B", t0), true);
    await again.close();
    const mode = (await Deno.stat(join(dir, TASK_IDS_FILE))).mode! & 0o777;
    assert.equal(mode, 0o600);
  });
});

Deno.test("task ids: no count bound: 5000 ids in the window are all remembered", async () => {
  await withDir(async (dir) => {
    const t0 = Date.now();
    const s = store(dir, () => t0);
    const ids = Array.from({ length: 5000 }, (_, i) => `id-${i}`);
    // Claimed together: they share writes, every claim resolves once it is durable.
    assert.deepEqual(
      new Set(await Promise.all(ids.map((id) => s.claim(id, t0)))),
      new Set([true]),
    );
    await s.close();
    const again = store(dir, () => t0 + 6 * DAY);
    for (const id of [ids[0], ids[999], ids[4999]]) {
      assert.equal(await again.claim(id, t0), false, id);
    }
    assert.equal(again.size, 5000);
    await again.close();
  });
});

Deno.test("task ids: kept until their window ends, then compacted away", async () => {
  await withDir(async (dir) => {
    const t0 = Date.now();
    let now = t0;
    const s = store(dir, () => now);
    await s.claim("old", t0 + 1000 - WINDOW); // its window ends in a second
    await s.claim("young", t0);
    await s.close();
    now = t0 + 2000;
    const later = store(dir, () => now);
    assert.equal(await later.lookup("old"), undefined);
    assert.ok(await later.lookup("young"));
    await later.close();
    const text = await Deno.readTextFile(join(dir, TASK_IDS_FILE));
    assert.doesNotMatch(text, /^old /m, "the expired record is gone from the file");
    assert.match(text, /^young /m);
  });
});

Deno.test("task ids: what was forgotten survives restarts (the clock set back does not help)", async () => {
  await withDir(async (dir) => {
    const t0 = Date.now();
    const s = store(dir, () => t0);
    await s.claim("A", t0 - DAY);
    await s.claim("B", t0);
    assert.equal(s.forgotten, 0, "nothing dropped yet");
    await s.close();
    // A week later A's window has ended: dropped (compacted away), remembered as a bound.
    const later = store(dir, () => t0 + 6.5 * DAY);
    assert.equal(await later.lookup("A"), undefined);
    assert.ok(await later.lookup("B"));
    assert.equal(later.forgotten, t0 - DAY);
    await later.close();
    assert.doesNotMatch(await Deno.readTextFile(join(dir, TASK_IDS_FILE)), /^A /m);
    // The clock set back by a week: A's copy would be inside the window by the clock, but
    // the store cannot vouch for it: it is not claimable. A later id is.
    const back = store(dir, () => t0 - DAY);
    await back.load();
    assert.equal(back.forgotten, t0 - DAY, "kept in the file");
    assert.equal(await back.claim("A", t0 - DAY), false);
    assert.equal(await back.claim("C", t0 - DAY + 1), true);
    await back.close();
  });
});

Deno.test("task ids: the first log format (forgetAfter, @hw) is read once and rewritten", async () => {
  await withDir(async (dir) => {
    const t0 = Date.now();
    await Deno.mkdir(dir, { recursive: true });
    // v1: <id> <forgetAfter> <seenAt>, and the high-water mark of a clock that was 3 h ahead.
    await Deno.writeTextFile(
      join(dir, TASK_IDS_FILE),
      `@hw ${t0 + 3 * 3_600_000}\nA ${t0 + WINDOW} ${t0}\nX ${t0 + DAY} ${t0} c\n`,
    );
    const logs: string[] = [];
    const s = new TaskIdStore({
      stateDir: dir,
      windowMs: WINDOW,
      clock: () => t0,
      log: (e) => logs.push(e),
    });
    assert.equal(await s.claim("A", t0), false);
    assert.equal((await s.lookup("X"))?.cancelled, true);
    // Kept at least as long as before (its window now starts at its old forgetAfter).
    assert.equal((await s.lookup("X"))?.createdAt, t0 + DAY);
    // What v1 may have dropped (forgetAfter before the mark): created before mark − window.
    assert.equal(s.forgotten, t0 + 3 * 3_600_000 - WINDOW);
    assert.equal(await s.claim("fresh", t0), true, "a task created now is claimable");
    await s.close();
    assert.ok(logs.includes("task_ids.upgraded"));
    const text = await Deno.readTextFile(join(dir, TASK_IDS_FILE));
    assert.match(text, /^@v2\n@forgotten \d+\n/);
    assert.doesNotMatch(text, /@hw/);
  });
});

Deno.test("task ids: a torn last line is skipped and counted; the rest is kept", async () => {
  await withDir(async (dir) => {
    const t0 = Date.now();
    const s = store(dir, () => t0);
    await s.claim("A", t0);
    await s.close();
    await Deno.writeTextFile(join(dir, TASK_IDS_FILE), "B 12", { append: true });
    const logs: string[] = [];
    const again = new TaskIdStore({
      stateDir: dir,
      windowMs: WINDOW,
      clock: () => t0,
      log: (e) => logs.push(e),
    });
    assert.equal(await again.claim("A", t0), false);
    assert.equal(again.corrupt, 1);
    assert.ok(logs.includes("task_ids.corrupt"));
    assert.equal(await again.claim("B", t0), true, "B never resolved, so it never ran");
    await again.close();
  });
});

Deno.test("task ids: the former task-ids.json is imported once, for a whole window", async () => {
  await withDir(async (dir) => {
    const t0 = Date.now();
    await Deno.writeTextFile(join(dir, "task-ids.json"), JSON.stringify({ ids: ["L1", "L2"] }));
    const s = store(dir, () => t0);
    assert.equal(await s.claim("L1", t0 + 1), false);
    assert.equal((await s.lookup("L2"))?.createdAt, t0, "its window starts at the import");
    await s.close();
    await assert.rejects(Deno.stat(join(dir, "task-ids.json")), Deno.errors.NotFound);
    const again = store(dir, () => t0 + WINDOW - 1);
    assert.equal(await again.claim("L2", t0 + 1), false);
    await again.close();
  });
});

Deno.test("task ids: beyond maxIds live ids a claim throws; expired ones make room", async () => {
  await withDir(async (dir) => {
    const t0 = Date.now();
    let now = t0;
    const s = store(dir, () => now, { maxIds: 3 });
    await s.claim("a", t0 + 1000 - WINDOW);
    await s.claim("b", t0);
    await s.claim("c", t0);
    await assert.rejects(
      s.claim("d", t0),
      /3 task ids are within the replay window \(limit 3\)/,
    );
    now = t0 + 2000; // "a" is past its window now
    assert.equal(await s.claim("d", t0), true);
    await s.close();
  });
});

Deno.test("task ids: cancels claim ids with a mark; an unreadable file refuses claims", async () => {
  await withDir(async (dir) => {
    const t0 = Date.now();
    const s = store(dir, () => t0);
    await s.claim("X", t0, { cancelled: true });
    await s.close();
    assert.equal((await store(dir, () => t0).lookup("X"))?.cancelled, true);
    const bad = join(dir, "bad");
    await Deno.mkdir(join(bad, TASK_IDS_FILE), { recursive: true }); // a directory: EISDIR
    await assert.rejects(
      store(bad, () => t0).claim("Y", t0),
      /cannot read .*task-ids\.log/,
    );
  });
});

// ---------------------------------------------------------------------------------------------
// Fault injection: a full disk (a real tmpfs)

import { fillDisk, PAGE, withTmpfs } from "./testing/tmpfs.ts";

Deno.test("task ids: after a failed append (full disk, torn line) the next claim survives a restart", async () => {
  await withTmpfs(8 * PAGE, async (mnt) => {
    const dir = join(mnt, "state");
    const t0 = Date.now();
    const s = store(dir, () => t0);
    assert.equal(await s.claim("first", t0), true); // the file now has its page
    const disk = await fillDisk(mnt);
    assert.ok(disk.bytes > 0, "the filler took the rest of the tmpfs");
    // Claims fill what is left of the file's page; the one that crosses it fails.
    const file = join(dir, TASK_IDS_FILE);
    let failed: string | undefined;
    let error = "";
    let before = 0;
    for (let i = 0; i < 500 && !failed; i++) {
      const id = `task-${String(i).padStart(4, "0")}`;
      before = (await Deno.stat(file)).size;
      await s.claim(id, t0).catch((err) => {
        failed = id;
        error = String(err);
      });
    }
    // Control: the fault really happened, and its write was short (it began in the free rest
    // of the file's page and crossed into a page the disk did not have): a torn line.
    assert.ok(failed, "a claim failed on the full disk");
    assert.match(error, /No space left|os error 28/);
    const record = `${failed} ${t0} ${t0}\n`.length;
    assert.ok(before % PAGE !== 0 && before % PAGE + record > PAGE, `${before} + ${record}`);
    // The torn line is cut off again.
    assert.equal((await Deno.readFile(file)).at(-1), 0x0a, "the file ends with a whole line");
    await disk.free();
    assert.equal(await s.claim("after-disk-freed", t0), true);
    await s.close();
    const again = store(dir, () => t0 + 1000);
    assert.ok(await again.lookup("after-disk-freed"), "a claim that resolved is remembered");
    assert.ok(await again.lookup("first"));
    assert.equal(await again.lookup(failed!), undefined, "the failed claim never resolved");
    await again.close();
  });
});

Deno.test("task ids: a torn tail the cut could not remove is ended before the next record", async () => {
  await withDir(async (dir) => {
    const t0 = Date.now();
    const s = store(dir, () => t0);
    await s.load();
    // As if a failed append could not be cut back: a torn line, and no handle open.
    await Deno.writeTextFile(join(dir, TASK_IDS_FILE), `A ${t0} ${t0}\nB 12`);
    assert.equal(await s.claim("C", t0), true);
    await s.close();
    const again = store(dir, () => t0);
    assert.ok(await again.lookup("C"));
    assert.ok(await again.lookup("A"));
    assert.equal(again.corrupt, 1, "the torn line is a line of its own, skipped");
    await again.close();
  });
});

Deno.test("task ids: a start on a full disk whose compaction cannot be written still claims (appends fit), and keeps every id", async () => {
  await withTmpfs(8 * PAGE, async (mnt) => {
    const dir = join(mnt, "state");
    const t0 = Date.now();
    const s = store(dir, () => t0);
    // Two pages of ids created an hour apart: the older half expires by the next start.
    for (let i = 0; i < 120; i++) {
      assert.equal(await s.claim(`old-${String(i).padStart(3, "0")}`, t0 - WINDOW + 1000), true);
    }
    for (let i = 0; i < 60; i++) {
      assert.equal(await s.claim(`live-${String(i).padStart(3, "0")}`, t0), true);
    }
    await s.close();
    const file = join(dir, TASK_IDS_FILE);
    const size = (await Deno.stat(file)).size;
    assert.ok(
      size > PAGE && size % PAGE < PAGE - 200,
      `room for a few records in the last page (${size})`,
    );
    const disk = await fillDisk(mnt);
    try {
      assert.ok(disk.bytes > 0, "the filler took the rest of the tmpfs");
      // Control: the rewrite cannot be made on this disk (a new file needs a page).
      await assert.rejects(
        Deno.writeTextFile(join(dir, "probe"), "x".repeat(PAGE)),
        /No space left|os error 28/,
      );
      await Deno.remove(join(dir, "probe")).catch(() => {});
      // The next start: 120 of 180 records are dead, so it compacts; that write fails.
      const later = store(dir, () => t0 + 2000);
      assert.equal(await later.claim("new-task", t0 + 2000), true, "refused while appends fit");
      assert.equal(await later.claim("live-000", t0), false, "a live id is still seen");
      assert.equal(await later.claim("old-000", t0 - WINDOW + 1000), false, "a forgotten id");
      await later.close();
    } finally {
      await disk.free();
    }
    const again = store(dir, () => t0 + 3000);
    assert.ok(await again.lookup("new-task"), "the claim made on the full disk survives");
    assert.ok(await again.lookup("live-059"));
    await again.close();
  });
});
