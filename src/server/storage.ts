/**
 * Which registry backend the server runs on: SQLite in the data dir (the default), or
 * PostgreSQL (`--database postgres://...`).
 */
import type { Registry } from "./registry.ts";
import { openSqliteRegistry } from "./registry_sqlite.ts";
import { openPostgresRegistry, type PostgresConfig } from "./registry_postgres.ts";

export type StorageSpec =
  | { kind: "sqlite"; dataDir: string }
  | { kind: "postgres"; config: PostgresConfig };

export function openRegistry(
  spec: StorageSpec,
  opts: { onError?: (message: string) => void } = {},
): Promise<Registry> {
  return spec.kind === "sqlite"
    ? openSqliteRegistry(spec.dataDir)
    : openPostgresRegistry(spec.config, { onError: opts.onError });
}
