/**
 * The command-line frame: a tree of commands, each with its own flags, help and `run`.
 * Parsing never exits; it throws `UsageError` (exit 2) with a suggestion for the closest
 * valid name. Only `main.ts` exits.
 */
import { UsageError } from "./errors.ts";
import type { Io } from "./io.ts";

export type FlagType = "boolean" | "string" | "number";

export interface FlagSpec {
  name: string;
  short?: string;
  type: FlagType;
  description: string;
  /** Placeholder in help: `--robot-id ID`. */
  valueName?: string;
  /** May be given several times; the value is then a list. */
  multiple?: boolean;
}

export interface PositionalSpec {
  name: string;
  description: string;
  optional?: boolean;
  variadic?: boolean;
}

export interface CommandSpec {
  name: string;
  summary: string;
  /** Extra paragraphs for `--help`. */
  description?: string;
  flags?: FlagSpec[];
  positionals?: PositionalSpec[];
  /** Accept everything after `--` verbatim (as `args.rest`). */
  acceptsRest?: boolean;
  subcommands?: CommandSpec[];
  hidden?: boolean;
  /**
   * A lazy command: only `name` is given here and `load` imports the module that defines the
   * whole spec, so a process loads only the command it runs (see `loadCommandPath`).
   */
  load?: () => Promise<CommandSpec>;
  /** Returns the exit code (default 0) or throws a CliError. */
  run?: (args: Args, io: Io) => Promise<number | void>;
}

/** Parsed arguments with typed accessors. */
export class Args {
  constructor(
    readonly command: string[],
    private readonly values: Map<string, string | boolean | number | string[]>,
    readonly positionals: string[],
    readonly rest: string[],
  ) {}

  has(name: string): boolean {
    return this.values.has(name);
  }
  bool(name: string): boolean {
    return this.values.get(name) === true;
  }
  string(name: string): string | undefined {
    const v = this.values.get(name);
    return typeof v === "string" ? v : undefined;
  }
  number(name: string): number | undefined {
    const v = this.values.get(name);
    return typeof v === "number" ? v : undefined;
  }
  list(name: string): string[] {
    const v = this.values.get(name);
    return Array.isArray(v) ? v : typeof v === "string" ? [v] : [];
  }
}

const HELP_FLAG: FlagSpec = { name: "help", short: "h", type: "boolean", description: "Show help" };

/** Levenshtein distance, for "did you mean". */
export function editDistance(a: string, b: string): number {
  const prev = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    let diag = prev[0];
    prev[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const tmp = prev[j];
      prev[j] = Math.min(prev[j] + 1, prev[j - 1] + 1, diag + (a[i - 1] === b[j - 1] ? 0 : 1));
      diag = tmp;
    }
  }
  return prev[b.length];
}

/** The closest candidate, if it is close enough to be a plausible typo. */
export function closest(word: string, candidates: string[]): string | undefined {
  let best: string | undefined;
  let bestD = Infinity;
  for (const c of candidates) {
    const d = c.startsWith(word) && word.length >= 2 ? 0.5 : editDistance(word, c);
    if (d < bestD) {
      bestD = d;
      best = c;
    }
  }
  return best !== undefined && bestD <= Math.max(2, Math.floor(word.length / 3)) ? best : undefined;
}

function suggestion(word: string, candidates: string[], prefix = ""): string {
  const c = closest(word, candidates);
  return c ? ` (did you mean '${prefix}${c}'?)` : "";
}

export interface Resolved {
  spec: CommandSpec;
  path: string[];
  args: Args;
  help: boolean;
}

/** Walks the command tree and parses the flags of the command it lands on. */
export function resolve(root: CommandSpec, argv: string[]): Resolved {
  let spec = root;
  const path: string[] = [root.name];
  let i = 0;
  // Descend through subcommand names; flags may only follow the deepest command.
  while (spec.subcommands && i < argv.length && !argv[i].startsWith("-")) {
    const name = argv[i];
    const next = spec.subcommands.find((c) => c.name === name);
    if (!next) {
      if (!spec.run || !spec.positionals?.length) {
        const visible = spec.subcommands.filter((c) => !c.hidden).map((c) => c.name);
        throw new UsageError(
          `unknown command '${path.slice(1).concat(name).join(" ")}'${
            suggestion(name, visible)
          }; run '${path.join(" ")} --help' to list commands`,
        );
      }
      break;
    }
    spec = next;
    path.push(name);
    i++;
  }
  const flags = [...(spec.flags ?? []), HELP_FLAG];
  const values = new Map<string, string | boolean | number | string[]>();
  const positionals: string[] = [];
  let rest: string[] = [];
  // Messages are prefixed with "k8s4r: " by main.ts.
  const cmdName = path.slice(1).join(" ") || path[0];
  for (; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--") {
      if (!spec.acceptsRest) throw new UsageError(`${cmdName}: unexpected '--'`);
      rest = argv.slice(i + 1);
      break;
    }
    if (a.startsWith("-") && a !== "-") {
      const long = a.startsWith("--");
      const body = long ? a.slice(2) : a.slice(1);
      const eq = body.indexOf("=");
      const key = eq >= 0 ? body.slice(0, eq) : body;
      const flag = long ? flags.find((f) => f.name === key) : flags.find((f) => f.short === key);
      if (!flag) {
        const names = flags.map((f) => f.name);
        throw new UsageError(
          `${cmdName}: unknown flag '${long ? "--" : "-"}${key}'${suggestion(key, names, "--")}`,
        );
      }
      let value: string | boolean | number;
      if (flag.type === "boolean") {
        if (eq >= 0) {
          const v = body.slice(eq + 1);
          if (v !== "true" && v !== "false") {
            throw new UsageError(`${cmdName}: --${flag.name} expects true or false, got '${v}'`);
          }
          value = v === "true";
        } else value = true;
      } else {
        let raw: string;
        if (eq >= 0) raw = body.slice(eq + 1);
        else {
          if (i + 1 >= argv.length) {
            throw new UsageError(
              `${cmdName}: --${flag.name} needs a value (${flag.valueName ?? flag.type})`,
            );
          }
          raw = argv[++i];
        }
        if (flag.type === "number") {
          const n = Number(raw);
          if (raw.trim() === "" || !Number.isFinite(n)) {
            throw new UsageError(`${cmdName}: --${flag.name} expects a number, got '${raw}'`);
          }
          value = n;
        } else value = raw;
      }
      if (flag.multiple) {
        const prev = values.get(flag.name);
        values.set(flag.name, [...(Array.isArray(prev) ? prev : []), String(value)]);
      } else values.set(flag.name, value);
      continue;
    }
    positionals.push(a);
  }
  const help = values.get("help") === true;
  if (!help) {
    const specPos = spec.positionals ?? [];
    const variadic = specPos.some((p) => p.variadic);
    if (!variadic && positionals.length > specPos.length) {
      const extra = positionals[specPos.length];
      const subs = spec.subcommands?.filter((c) => !c.hidden).map((c) => c.name) ?? [];
      throw new UsageError(
        `${cmdName}: unexpected argument '${extra}'${suggestion(extra, subs)}`,
      );
    }
    const required = specPos.filter((p) => !p.optional && !p.variadic);
    if (positionals.length < required.length) {
      throw new UsageError(
        `${cmdName}: missing ${
          required[positionals.length].name.toUpperCase()
        }; see '${cmdName} --help'`,
      );
    }
  }
  return { spec, path, args: new Args(path.slice(1), values, positionals, rest), help };
}

/** `--help` text for one command. */
export function renderHelp(spec: CommandSpec, path: string[]): string {
  const name = path.join(" ");
  const lines: string[] = [];
  const pos = (spec.positionals ?? []).map((p) => {
    const n = p.name.toUpperCase() + (p.variadic ? "..." : "");
    return p.optional || p.variadic ? `[${n}]` : n;
  });
  const usage = [name];
  if (spec.subcommands?.length) usage.push("<command>");
  usage.push("[flags]"); // every command has at least --help
  usage.push(...pos);
  if (spec.acceptsRest) usage.push("-- ARGS...");
  lines.push(`${spec.summary}`, "", `Usage: ${usage.join(" ")}`);
  if (spec.description) lines.push("", spec.description.trimEnd());
  const subs = (spec.subcommands ?? []).filter((c) => !c.hidden);
  if (subs.length) {
    lines.push("", "Commands:");
    const w = Math.max(...subs.map((c) => c.name.length));
    for (const c of subs) lines.push(`  ${c.name.padEnd(w)}  ${c.summary}`);
  }
  const flags = [...(spec.flags ?? []), HELP_FLAG];
  const cols = flags.map((f) => {
    const head = `${f.short ? `-${f.short}, ` : "    "}--${f.name}${
      f.type === "boolean" ? "" : ` ${f.valueName ?? f.type.toUpperCase()}`
    }`;
    return [head, f.description + (f.multiple ? " (repeatable)" : "")];
  });
  const w = Math.max(...cols.map((c) => c[0].length));
  lines.push("", "Flags:");
  for (const [h, d] of cols) lines.push(`  ${h.padEnd(w)}  ${d}`);
  if (subs.length) {
    lines.push("", `Run '${name} <command> --help' for more about a command.`);
  }
  return lines.join("\n") + "\n";
}

async function loaded(spec: CommandSpec): Promise<CommandSpec> {
  if (!spec.load) return spec;
  const real = await spec.load();
  if (real.name !== spec.name || real.load) {
    throw new Error(`lazy command '${spec.name}' loaded a spec named '${real.name}'`);
  }
  return real;
}

/**
 * A copy of the tree in which the lazy commands on argv's path are loaded. Where the walk stops
 * at a command with subcommands (its help, or an unknown name with suggestions), all of them
 * are loaded, so help can show their summaries.
 */
export async function loadCommandPath(root: CommandSpec, argv: string[]): Promise<CommandSpec> {
  const top = await loaded(root);
  if (!top.subcommands) return top;
  const name = argv[0];
  const hit = name !== undefined && !name.startsWith("-")
    ? top.subcommands.find((c) => c.name === name)
    : undefined;
  const subcommands = hit
    ? await Promise.all(
      top.subcommands.map((c) => (c === hit ? loadCommandPath(c, argv.slice(1)) : c)),
    )
    : await Promise.all(top.subcommands.map(loaded));
  return { ...top, subcommands };
}

/** Parses argv and runs the command it names. Returns the exit code. */
export async function runCli(root: CommandSpec, argv: string[], io: Io): Promise<number> {
  const r = resolve(await loadCommandPath(root, argv), argv);
  if (r.help) {
    io.stdout.write(renderHelp(r.spec, r.path));
    return 0;
  }
  if (!r.spec.run) {
    io.stdout.write(renderHelp(r.spec, r.path));
    return r.path.length === 1 ? 0 : 2;
  }
  const code = await r.spec.run(r.args, io);
  return typeof code === "number" ? code : 0;
}

/** The body of a command that a later issue fills. */
export function notImplemented(name: string): (args: Args, io: Io) => Promise<number> {
  return (_args, io) => {
    io.stderr.write(`k8s4r ${name}: not implemented yet\n`);
    return Promise.resolve(2);
  };
}
