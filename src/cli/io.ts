import type { ProcessRunner } from "../process/mod.ts";
import { realRunner } from "../process/mod.ts";

/** Somewhere text can be written: the terminal, or a buffer in tests. */
export interface Writer {
  write(text: string): void;
}

/**
 * Everything a command touches outside itself. Commands receive it as a parameter so that tests
 * can capture output, set the environment and record the argv of every process started.
 */
export interface Io {
  stdout: Writer;
  stderr: Writer;
  env: Record<string, string | undefined>;
  runner: ProcessRunner;
  /** The project directory that relative paths such as `config/` and `.dev-env/` resolve against. */
  cwd: string;
  /** True when stdout is an interactive terminal (live progress, colour unless NO_COLOR). */
  isTty: boolean;
  /** Aborted on SIGINT/SIGTERM; long-running commands stop cleanly when it fires. */
  signal: AbortSignal;
}

/** Colour is on only on a TTY and without NO_COLOR (https://no-color.org). */
export function colorEnabled(io: Pick<Io, "isTty" | "env">): boolean {
  return io.isTty && !io.env["NO_COLOR"];
}

const encoder = new TextEncoder();

function fdWriter(file: { writeSync(p: Uint8Array): number }): Writer {
  return {
    write(text: string) {
      const bytes = encoder.encode(text);
      let off = 0;
      while (off < bytes.length) off += file.writeSync(bytes.subarray(off));
    },
  };
}

/** The real process I/O, used by `main.ts`. */
export function realIo(signal: AbortSignal): Io {
  return {
    stdout: fdWriter(Deno.stdout),
    stderr: fdWriter(Deno.stderr),
    env: Deno.env.toObject(),
    runner: realRunner,
    cwd: Deno.cwd(),
    isTty: Deno.stdout.isTerminal(),
    signal,
  };
}

/** An Io whose output lands in strings, for tests. */
export function bufferIo(
  opts: Partial<Omit<Io, "stdout" | "stderr">> = {},
): Io & { out: () => string; err: () => string } {
  let out = "";
  let err = "";
  return {
    stdout: { write: (t) => void (out += t) },
    stderr: { write: (t) => void (err += t) },
    env: opts.env ?? {},
    runner: opts.runner ?? realRunner,
    cwd: opts.cwd ?? Deno.cwd(),
    isTty: opts.isTty ?? false,
    signal: opts.signal ?? new AbortController().signal,
    out: () => out,
    err: () => err,
  };
}
