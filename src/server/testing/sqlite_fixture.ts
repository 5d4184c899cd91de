/** The SQLite store for the registry contract: a registry.sqlite in a temp dir. */
import { DatabaseSync } from "node:sqlite";
import { join } from "node:path";
import { DB_FILE, openSqliteRegistry } from "../registry_sqlite.ts";
import type { RegistryFixture } from "./registry_contract.ts";

export const sqliteFixture: RegistryFixture = {
  name: "sqlite",
  async create() {
    const dir = await Deno.makeTempDir({ prefix: "k8s4r-registry-" });
    const dataDir = join(dir, "data");
    return {
      open: () => openSqliteRegistry(dataDir),
      async forgeSchemaVersion(v) {
        await Deno.mkdir(dataDir, { recursive: true });
        const db = new DatabaseSync(join(dataDir, DB_FILE));
        db.exec(`PRAGMA user_version = ${v}`);
        db.close();
      },
      exec(sql) {
        const db = new DatabaseSync(join(dataDir, DB_FILE));
        try {
          db.exec("PRAGMA busy_timeout = 10000");
          db.exec(sql);
        } finally {
          db.close();
        }
        return Promise.resolve();
      },
      dispose: () => Deno.remove(dir, { recursive: true }),
    };
  },
};
