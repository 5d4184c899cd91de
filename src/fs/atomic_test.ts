import assert from "node:assert/strict";
import { join } from "node:path";
import {
  isAtomicTemp,
  type PairFileWriter,
  writeFileAtomic,
  writeFilePairAtomic,
} from "./atomic.ts";

async function withDir(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-atomic-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const read = (p: string) => Deno.readTextFileSync(p);

Deno.test("writeFilePairAtomic: a failed second write leaves the old pair; the next write switches both", async () => {
  await withDir(async (dir) => {
    const key = join(dir, "a.key");
    const crt = join(dir, "a.crt");
    const pair = (n: number) =>
      [{ path: key, data: `key-${n}\n`, mode: 0o600 }, {
        path: crt,
        data: `cert-${n}\n`,
        mode: 0o644,
      }] as const;
    // The layout before: two regular files (written as k8s4r did before the pair writer).
    await writeFileAtomic(key, "key-0\n", 0o600);
    await writeFileAtomic(crt, "cert-0\n", 0o644);
    await writeFilePairAtomic(...pair(1));
    assert.deepEqual([read(key), read(crt)], ["key-1\n", "cert-1\n"]);
    assert.equal(Deno.statSync(key).mode! & 0o777, 0o600);
    assert.equal(Deno.statSync(crt).mode! & 0o777, 0o644);
    assert.ok(Deno.lstatSync(key).isSymlink && Deno.lstatSync(crt).isSymlink);

    // The second file of the next version cannot be written (disk full, a crash): nothing moves.
    let calls = 0;
    const failSecond: PairFileWriter = (p, d, m) => {
      if (++calls === 2) return Promise.reject(new Error("ENOSPC: no space left on device"));
      return writeFileAtomic(p, d, m);
    };
    await assert.rejects(writeFilePairAtomic(...pair(2), { writeFile: failSecond }), /ENOSPC/);
    assert.deepEqual([read(key), read(crt)], ["key-1\n", "cert-1\n"], "a half-written pair");
    // The control: the same write without the fault switches both.
    await writeFilePairAtomic(...pair(2));
    assert.deepEqual([read(key), read(crt)], ["key-2\n", "cert-2\n"]);
    await writeFilePairAtomic(...pair(3));
    const versions = [...Deno.readDirSync(join(dir, ".a.key.pair"))].filter((e) =>
      e.name.startsWith("v-")
    );
    assert.ok(versions.length <= 2, `old versions kept: ${versions.map((v) => v.name)}`);
    assert.deepEqual([read(key), read(crt)], ["key-3\n", "cert-3\n"]);
  });
});

Deno.test("writeFilePairAtomic: the first write over two regular files never shows one of each (the second path cannot be replaced)", async () => {
  if (Deno.uid() !== 0) throw new Error("uses chattr +i (immutable file): run as root");
  await withDir(async (dir) => {
    const key = join(dir, "b.key");
    const crt = join(dir, "b.crt");
    await writeFileAtomic(key, "key-0\n", 0o600);
    await writeFileAtomic(crt, "cert-0\n", 0o644);
    await new Deno.Command("chattr", { args: ["+i", crt] }).output();
    try {
      await assert.rejects(
        writeFilePairAtomic({ path: key, data: "key-1\n", mode: 0o600 }, {
          path: crt,
          data: "cert-1\n",
          mode: 0o644,
        }),
      );
      assert.deepEqual([read(key), read(crt)], ["key-0\n", "cert-0\n"], "a mismatched pair");
    } finally {
      await new Deno.Command("chattr", { args: ["-i", crt] }).output();
    }
  });
});

Deno.test("writeFileAtomic: the new file is fsynced before the rename, and its directory after it", async () => {
  await withDir(async (dir) => {
    const path = join(dir, "sub", "f.json");
    // A spy on the Deno calls the writer makes (the real ones run underneath): which file each
    // sync() was for, and where the rename falls.
    const events: string[] = [];
    const open = Deno.open;
    const rename = Deno.rename;
    // deno-lint-ignore no-explicit-any
    const D = Deno as any;
    D.open = async (p: string | URL, o?: Deno.OpenOptions) => {
      const f = await open(p, o);
      const sync = f.sync.bind(f);
      f.sync = async () => {
        await sync();
        events.push(`sync ${String(p).replace(/\.tmp-.*$/, ".tmp")}`);
      };
      return f;
    };
    D.rename = async (a: string | URL, b: string | URL) => {
      await rename(a, b);
      events.push(`rename ${String(a).replace(/\.tmp-.*$/, ".tmp")} -> ${b}`);
    };
    try {
      await writeFileAtomic(path, '{"v":1}\n', 0o600);
    } finally {
      D.open = open;
      D.rename = rename;
    }
    assert.deepEqual(events, [
      `sync ${path}.tmp`,
      `rename ${path}.tmp -> ${path}`,
      `sync ${join(dir, "sub")}`,
    ]);
    // The control: the file is there, whole, with its mode.
    assert.equal(await Deno.readTextFile(path), '{"v":1}\n');
    assert.equal(Deno.statSync(path).mode! & 0o777, 0o600);
  });
});

Deno.test("isAtomicTemp: knows the temp files writeFileAtomic makes (and the agent's older names), not the files", async () => {
  await withDir(async (dir) => {
    const path = join(dir, "outbox.jsonl");
    const temps: string[] = [];
    const open = Deno.open;
    // deno-lint-ignore no-explicit-any
    const D = Deno as any;
    D.open = (p: string | URL, o?: Deno.OpenOptions) => {
      if (o?.createNew) temps.push(String(p).slice(dir.length + 1));
      return open(p, o);
    };
    try {
      await writeFileAtomic(path, "x\n", 0o600);
    } finally {
      D.open = open;
    }
    assert.equal(temps.length, 1, `temp files: ${temps}`);
    assert.ok(isAtomicTemp(temps[0]), temps[0]);
    assert.ok(isAtomicTemp("outbox.jsonl.tmp-4242-17"), "the agent's older counter names");
    assert.equal(isAtomicTemp("outbox.jsonl"), false);
    assert.equal(isAtomicTemp("t-1.json"), false);
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["outbox.jsonl"]);
  });
});
