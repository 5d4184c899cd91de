/**
 * Errors that carry the process exit code. Subcommands throw these; only `main.ts` turns them
 * into an exit status.
 */
export class CliError extends Error {
  constructor(message: string, readonly exitCode = 1, readonly hint?: string) {
    super(message);
    this.name = "CliError";
  }
}

/** Bad command line: unknown command or flag, missing or malformed value. Exits 2. */
export class UsageError extends CliError {
  constructor(message: string, hint?: string) {
    super(message, 2, hint);
    this.name = "UsageError";
  }
}

/**
 * Bad configuration file content. The message always names the file, and the line and key
 * when they are known, plus what was expected: `config/agent/plugins.yaml:7: spire.logLevel:
 * expected one of DEBUG, INFO, WARN, ERROR, got "LOUD"`.
 */
export class ConfigError extends CliError {
  constructor(
    readonly file: string,
    readonly line: number | undefined,
    readonly key: string | undefined,
    readonly expected: string,
  ) {
    super(
      `${file}${line !== undefined ? `:${line}` : ""}: ${key ? `${key}: ` : ""}${expected}`,
      2,
    );
    this.name = "ConfigError";
  }
}

/** Turns anything thrown into a one-line message, never a stack trace. */
export function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message.split("\n")[0] || err.name;
  return String(err);
}
