/**
 * A private PostgreSQL cluster in a directory: `initdb`, `pg_ctl start`, `pg_ctl stop`, with
 * the server's pid checked (postmaster.pid + the start time in /proc) so that only the process
 * this cluster started is ever signalled. For tests (tests/helpers/postgres.ts) and a local
 * development stack; a production PostgreSQL is the operator's.
 *
 * - Run as root, every PostgreSQL binary runs as the `postgres` user (`runuser -u postgres
 *   --`): the server refuses to run as root. The directory then belongs to postgres.
 * - Listens on a unix socket in the directory and on 127.0.0.1:PORT, with SCRAM-SHA-256 for
 *   both (and TLS on TCP when given a certificate); the superuser's password goes to initdb
 *   through a 0600 file, never argv.
 * - `owner` records who started it (pid + start time): `reapOrphans()` stops the clusters of
 *   owners that died without stopping theirs (a test runner killed with SIGKILL).
 */
import { join } from "node:path";
import {
  isRecordAlive,
  type PidRecord,
  type ProcessRunner,
  processStartTime,
  stopPid,
  waitFor,
} from "../process/mod.ts";

export const PG_MAJOR = 15;
const OWNER_FILE = "k8s4r-owner.json";

export interface PostgresBinaries {
  dir: string;
  initdb: string;
  pgCtl: string;
  version: string;
}

/**
 * PostgreSQL's server binaries: `$K8S4R_PG_BINDIR`, else Debian's /usr/lib/postgresql/15/bin,
 * else the newest /usr/lib/postgresql/N/bin. The error says what to install.
 */
export async function findPostgresBinaries(
  runner: ProcessRunner,
  env: Record<string, string | undefined> = Deno.env.toObject(),
): Promise<PostgresBinaries> {
  const candidates: string[] = [];
  if (env["K8S4R_PG_BINDIR"]) candidates.push(env["K8S4R_PG_BINDIR"]);
  candidates.push(`/usr/lib/postgresql/${PG_MAJOR}/bin`);
  try {
    const majors: number[] = [];
    for (const e of Deno.readDirSync("/usr/lib/postgresql")) {
      if (/^\d+$/.test(e.name)) majors.push(Number(e.name));
    }
    for (const m of majors.sort((a, b) => b - a)) candidates.push(`/usr/lib/postgresql/${m}/bin`);
  } catch { /* no Debian layout */ }
  for (const dir of candidates) {
    const initdb = join(dir, "initdb");
    try {
      if (!Deno.statSync(initdb).isFile) continue;
    } catch {
      continue;
    }
    const out = await runner.output(join(dir, "pg_ctl"), ["--version"], { timeoutMs: 10_000 });
    const version = /(\d+(?:\.\d+)*)/.exec(out.stdout)?.[1] ?? "unknown";
    return { dir, initdb, pgCtl: join(dir, "pg_ctl"), version };
  }
  throw new Error(
    `PostgreSQL not found: no initdb in ${
      candidates.join(", ")
    } (install it: apt-get install postgresql-${PG_MAJOR}, or set K8S4R_PG_BINDIR)`,
  );
}

export interface ClusterOptions {
  runner: ProcessRunner;
  binaries: PostgresBinaries;
  /** Holds data/, the socket and the log. Created; must not exist yet or be empty. */
  dir: string;
  port: number;
  superuser: string;
  superuserPassword: string;
  /** Extra `-c name=value` server settings. */
  settings?: Record<string, string>;
  /** TLS on TCP (`ssl = on`) with this certificate and key (PEM); plain connections stay allowed. */
  tls?: { certPem: string; keyPem: string };
}

/** Who runs the PostgreSQL binaries: ourselves, or `postgres` when we are root. */
function asPostgres(): { prefix: string[]; uid?: number; gid?: number } {
  if (Deno.uid() !== 0) return { prefix: [] };
  const line = Deno.readTextFileSync("/etc/passwd").split("\n")
    .find((l) => l.startsWith("postgres:"));
  if (!line) {
    throw new Error(
      "running as root, and there is no 'postgres' user to run PostgreSQL as (install postgresql)",
    );
  }
  const f = line.split(":");
  return { prefix: ["runuser", "-u", "postgres", "--"], uid: Number(f[2]), gid: Number(f[3]) };
}

export class PostgresCluster {
  readonly dataDir: string;
  readonly socketDir: string;
  readonly logFile: string;
  private server?: PidRecord;
  private readonly user = asPostgres();

  private constructor(private readonly o: ClusterOptions) {
    this.dataDir = join(o.dir, "data");
    this.socketDir = o.dir;
    this.logFile = join(o.dir, "postgres.log");
  }

  get port(): number {
    return this.o.port;
  }

  /** The server's pid while it runs (the one we started). */
  get pid(): number | undefined {
    return this.server && isRecordAlive(this.server) ? this.server.pid : undefined;
  }

  private run(bin: string, args: string[], timeoutMs = 120_000) {
    const [cmd, ...pre] = [...this.user.prefix, bin];
    return this.o.runner.output(cmd, [...pre, ...args], { timeoutMs });
  }

  /** Creates the directory and the cluster (initdb); does not start it. */
  static async init(o: ClusterOptions): Promise<PostgresCluster> {
    const c = new PostgresCluster(o);
    await Deno.mkdir(o.dir, { recursive: true, mode: 0o700 });
    const self = processStartTime(Deno.pid);
    await Deno.writeTextFile(
      join(o.dir, OWNER_FILE),
      JSON.stringify({ pid: Deno.pid, startTime: self ?? 0 }) + "\n",
      { mode: 0o600 },
    );
    if (c.user.uid !== undefined) await Deno.chown(o.dir, c.user.uid, c.user.gid!);
    if (o.tls) {
      // PostgreSQL refuses a key that others may read, or that is not its user's.
      for (const [name, pem] of [["server.crt", o.tls.certPem], ["server.key", o.tls.keyPem]]) {
        await Deno.writeTextFile(join(o.dir, name), pem, { mode: 0o600 });
        if (c.user.uid !== undefined) await Deno.chown(join(o.dir, name), c.user.uid, c.user.gid!);
      }
    }
    const pwFile = join(o.dir, "initdb.pw");
    await Deno.writeTextFile(pwFile, o.superuserPassword + "\n", { mode: 0o600 });
    if (c.user.uid !== undefined) await Deno.chown(pwFile, c.user.uid, c.user.gid!);
    try {
      await c.run(o.binaries.initdb, [
        "-D",
        c.dataDir,
        "-U",
        o.superuser,
        `--pwfile=${pwFile}`,
        "--auth-local=scram-sha-256",
        "--auth-host=scram-sha-256",
        "-E",
        "UTF8",
        "--locale=C.UTF-8",
        "--no-sync", // initdb's own files only; the running server keeps fsync on
      ]);
    } finally {
      await Deno.remove(pwFile).catch(() => {});
    }
    return c;
  }

  /** `pg_ctl start -w`: returns once the server accepts connections. */
  async start(): Promise<void> {
    if (this.pid !== undefined) return;
    const settings: Record<string, string> = {
      listen_addresses: "127.0.0.1",
      shared_buffers: "32MB",
      ...(this.o.tls
        ? {
          ssl: "on",
          ssl_cert_file: join(this.o.dir, "server.crt"),
          ssl_key_file: join(this.o.dir, "server.key"),
        }
        : {}),
      ...this.o.settings,
    };
    const opts = [
      "-k",
      this.socketDir,
      "-p",
      String(this.o.port),
      ...Object.entries(settings).flatMap(([k, v]) => ["-c", `${k}=${v}`]),
    ];
    for (const a of opts) {
      if (/[\s'"\\$`]/.test(a)) throw new Error(`postgres option ${a}: no spaces or quotes`);
    }
    try {
      await this.run(this.o.binaries.pgCtl, [
        "-D",
        this.dataDir,
        "-l",
        this.logFile,
        "-w",
        "-t",
        "60",
        "-o",
        opts.join(" "),
        "start",
      ]);
    } catch (err) {
      throw new Error(
        `PostgreSQL did not start in ${this.o.dir}: ${(err as Error).message}; log: ${
          lastLines(await this.logTail(5))
        }`,
      );
    }
    const pid = Number(Deno.readTextFileSync(join(this.dataDir, "postmaster.pid")).split("\n")[0]);
    const startTime = processStartTime(pid);
    if (!Number.isInteger(pid) || startTime === undefined) {
      throw new Error(`PostgreSQL in ${this.o.dir}: no live server pid in postmaster.pid`);
    }
    this.server = {
      pid,
      startTime,
      cmd: "postgres",
      args: [],
      startedAt: new Date().toISOString(),
    };
  }

  /**
   * `pg_ctl stop -m fast` (clients are disconnected, the data is checkpointed), then checks
   * that the very process we started is gone; if it is not, SIGTERM/SIGKILL on that pid only.
   */
  async stop(): Promise<void> {
    const rec = this.server;
    if (!rec || !isRecordAlive(rec)) {
      this.server = undefined;
      return;
    }
    await this.run(this.o.binaries.pgCtl, [
      "-D",
      this.dataDir,
      "stop",
      "-m",
      "fast",
      "-w",
      "-t",
      "30",
    ])
      .catch(() => {});
    const gone = await waitFor(() => !isRecordAlive(rec), { timeoutMs: 10_000, intervalMs: 20 })
      .then(() => true, () => false);
    if (!gone) await stopPid(rec.pid, rec.startTime, 5000);
    if (isRecordAlive(rec)) throw new Error(`PostgreSQL pid ${rec.pid} would not stop`);
    this.server = undefined;
  }

  /** Stops the server and deletes the directory. */
  async destroy(): Promise<void> {
    try {
      await this.stop();
    } finally {
      await Deno.remove(this.o.dir, { recursive: true }).catch(() => {});
    }
  }

  logTail(n = 20): Promise<string> {
    return Deno.readTextFile(this.logFile).then(
      (t) => t.trimEnd().split("\n").slice(-n).join("\n"),
      () => "",
    );
  }
}

function lastLines(text: string): string {
  return text.split("\n").filter((l) => l.trim() !== "").slice(-3).join(" | ") || "empty";
}

/**
 * Stops and deletes the clusters under `parent` named `<prefix>*` whose owner process is gone
 * (its test runner was killed before it could stop them). Clusters of live owners are left
 * alone; only a server whose postmaster.pid is in that very directory is signalled.
 */
export async function reapOrphans(
  runner: ProcessRunner,
  binaries: PostgresBinaries,
  parent: string,
  prefix: string,
): Promise<string[]> {
  const reaped: string[] = [];
  let entries: Deno.DirEntry[];
  try {
    entries = [...Deno.readDirSync(parent)];
  } catch {
    return reaped;
  }
  const user = asPostgres();
  for (const e of entries) {
    if (!e.isDirectory || !e.name.startsWith(prefix)) continue;
    const dir = join(parent, e.name);
    let owner: { pid: number; startTime: number };
    try {
      owner = JSON.parse(Deno.readTextFileSync(join(dir, OWNER_FILE)));
    } catch {
      continue; // not one of ours (or still being created)
    }
    if (processStartTime(owner.pid) === owner.startTime) continue; // its owner is alive
    const data = join(dir, "data");
    let pid: number | undefined;
    try {
      pid = Number(Deno.readTextFileSync(join(data, "postmaster.pid")).split("\n")[0]);
    } catch { /* never started, or stopped */ }
    if (pid !== undefined && processStartTime(pid) !== undefined) {
      let ours = false;
      try {
        ours = Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0").includes(data);
      } catch { /* gone */ }
      if (!ours) continue;
      const [cmd, ...pre] = [...user.prefix, binaries.pgCtl];
      await runner.output(cmd, [...pre, "-D", data, "stop", "-m", "immediate", "-w"], {
        check: false,
        timeoutMs: 30_000,
      });
    }
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    reaped.push(dir);
  }
  return reaped;
}
