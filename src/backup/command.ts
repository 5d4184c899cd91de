/**
 * `k8s4r backup create|restore|show`. Which files and databases a control host has is handed
 * in by the CLI composition (src/cli/backup_paths.ts), as the doctor's paths are.
 */
import { resolve } from "node:path";
import type { CommandSpec, FlagSpec } from "../cli/mod.ts";
import type { Io } from "../cli/io.ts";
import { UsageError } from "../cli/errors.ts";
import { type BackupSources, createBackup, readBackup, restoreBackup } from "./mod.ts";

/** The control host's state for a project directory. */
export type BackupSourcesFor = (io: Io, projectDir: string) => BackupSources;

const PROJECT: FlagSpec = {
  name: "project-dir",
  type: "string",
  valueName: "DIR",
  description: "Project directory of the control host (default: current directory)",
};

function projectDir(io: Io, flag: string | undefined): string {
  return resolve(io.cwd, flag ?? io.env["K8S4R_PROJECT_DIR"] ?? ".");
}

function kib(n: number): string {
  return n < 1024 ? `${n} B` : `${(n / 1024).toFixed(1)} KiB`;
}

export function makeBackupCommand(sourcesFor: BackupSourcesFor): CommandSpec {
  return {
    name: "backup",
    summary: "Back up and restore the control host: SPIRE, keys, CAs, registry, MQTT logins",
    description:
      "create: SPIRE's datastore (SQLite by VACUUM INTO, PostgreSQL by pg_dump: consistent\n" +
      "while everything runs), SPIRE's keys, the root CA and the factory CA when there are\n" +
      "some, the fleet registry and the MQTT credentials, into a new directory (0700, files\n" +
      "0600) with a manifest of SHA-256 sums. restore: onto a clean control host (stopped),\n" +
      "after checking every sum; robots then come back with their own SVIDs, no new tokens.",
    subcommands: [
      {
        name: "create",
        summary: "Write a backup of the running (or stopped) control host into a new directory",
        flags: [
          {
            name: "output",
            short: "o",
            type: "string",
            valueName: "DIR",
            description: "The new backup directory",
          },
          PROJECT,
        ],
        async run(args, io) {
          const out = args.string("output");
          if (!out) throw new UsageError("backup create: --output DIR is required");
          const src = sourcesFor(io, projectDir(io, args.string("project-dir")));
          const dir = resolve(io.cwd, out);
          const m = await createBackup(src, dir, io);
          for (const it of m.items) {
            io.stdout.write(
              `  ${it.name.padEnd(22)} ${kib(it.bytes).padStart(10)}  ${it.restoreTo}\n`,
            );
          }
          if (m.absent.length) io.stdout.write(`  (not present: ${m.absent.join(", ")})\n`);
          io.stdout.write(`backup of ${m.items.length} items in ${dir} (mode ${m.mode})\n`);
          return 0;
        },
      },
      {
        name: "restore",
        summary: "Restore a backup onto a clean, stopped control host",
        positionals: [{ name: "dir", description: "The backup directory" }],
        flags: [
          { name: "force", type: "boolean", description: "Overwrite state that exists" },
          PROJECT,
        ],
        async run(args, io) {
          const src = sourcesFor(io, projectDir(io, args.string("project-dir")));
          const dir = resolve(io.cwd, args.positionals[0]);
          const r = await restoreBackup(dir, src, { force: args.bool("force") });
          for (const x of r.restored) io.stdout.write(`  ${x.name.padEnd(22)} -> ${x.to}\n`);
          io.stdout.write(
            `restored ${r.restored.length} items from ${dir}; start it: ${r.startHint}\n`,
          );
          return 0;
        },
      },
      {
        name: "show",
        summary: "Check a backup (every SHA-256) and list what it holds",
        positionals: [{ name: "dir", description: "The backup directory" }],
        async run(args, io) {
          const m = await readBackup(resolve(io.cwd, args.positionals[0]));
          io.stdout.write(`k8s4r backup of ${m.createdAt} (k8s4r ${m.k8s4rVersion}, ${m.mode})\n`);
          for (const it of m.items) {
            io.stdout.write(
              `  ${it.name.padEnd(22)} ${kib(it.bytes).padStart(10)}  sha256 ${
                it.sha256.slice(0, 16)
              }...  ${it.restoreTo}\n`,
            );
          }
          return 0;
        },
      },
    ],
  };
}
