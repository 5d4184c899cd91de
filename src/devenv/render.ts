/**
 * Pure presentation for devenv: step lines with elapsed time, the component table, and the
 * `component | line` prefix of `logs`. Colour only when the caller says so (TTY without
 * NO_COLOR); nothing here looks at the environment itself.
 */
import type { Writer } from "../cli/io.ts";

export interface ComponentStatus {
  name: string;
  running: boolean;
  pid: number | null;
  healthy: boolean;
  endpoint: string;
  /** Free text: SVID expiry, why it is unhealthy, bundle freshness... */
  detail: string;
}

const RESET = "\x1b[0m";
const PALETTE = ["36", "33", "32", "35", "34", "91", "96", "93", "92", "95"];

function paint(code: string, text: string, color: boolean): string {
  return color ? `\x1b[${code}m${text}${RESET}` : text;
}

export function formatSeconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)}s`;
}

/** `component | ` padded to `width`, in a stable per-component colour. */
export function logPrefix(component: string, width: number, index: number, color: boolean): string {
  const label = `${component.padEnd(width)} | `;
  return color ? paint(PALETTE[index % PALETTE.length], label, true) : label;
}

/** Prefixes every line of `text` (which may lack a trailing newline). */
export function prefixLines(text: string, prefix: string): string {
  if (text === "") return "";
  const lines = text.split("\n");
  if (lines[lines.length - 1] === "") lines.pop();
  return lines.map((l) => prefix + l + "\n").join("");
}

/** The table that `start` ends with and `status` prints. */
export function renderTable(rows: ComponentStatus[], color: boolean): string {
  const head = ["COMPONENT", "PID", "ENDPOINT", "STATE", "DETAIL"];
  const cells = rows.map((r) => [
    r.name,
    r.pid === null ? "-" : String(r.pid),
    r.endpoint,
    stateWord(r),
    r.detail,
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i].length)));
  const line = (c: string[], st?: ComponentStatus) =>
    c.map((v, i) => {
      const padded = i === c.length - 1 ? v : v.padEnd(widths[i]);
      if (i === 3 && st) return paint(stateColor(st), padded, color);
      return padded;
    }).join("  ").trimEnd() + "\n";
  return line(head) + cells.map((c, i) => line(c, rows[i])).join("");
}

export function stateWord(r: Pick<ComponentStatus, "running" | "healthy">): string {
  if (!r.running) return "stopped";
  return r.healthy ? "healthy" : "unhealthy";
}

function stateColor(r: ComponentStatus): string {
  if (!r.running) return "31";
  return r.healthy ? "32" : "33";
}

/** `{"components":[...]}` exactly as `status --json` prints it. */
export function renderJson(rows: ComponentStatus[]): string {
  return JSON.stringify(
    {
      components: rows.map((r) => ({
        name: r.name,
        running: r.running,
        pid: r.pid,
        healthy: r.healthy,
        endpoint: r.endpoint,
        detail: r.detail,
      })),
    },
    null,
    2,
  ) + "\n";
}

export interface StepRecord {
  name: string;
  /** When the step began, from the start of the whole run. */
  atMs: number;
  ms: number;
  /** What the step did: "started", "already running", "restarted", "created 2", ... */
  result: string;
  ok: boolean;
}

/**
 * Step lines with elapsed time; steps may run concurrently. On a TTY one live line shows the
 * steps under way with their timers, and each finished step prints its line above it; piped,
 * each step prints one plain line when it ends.
 */
export class Progress {
  readonly steps: StepRecord[] = [];
  private readonly t0: number;
  private readonly running = new Map<string, number>();
  private timer: ReturnType<typeof setInterval> | undefined;
  constructor(
    private readonly out: Writer,
    private readonly live: boolean,
    private readonly color: boolean,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.t0 = now();
  }

  elapsedMs(): number {
    return this.now() - this.t0;
  }

  private clock(): string {
    return paint("90", `[${formatSeconds(this.elapsedMs()).padStart(6)}]`, this.color);
  }

  private draw(): void {
    if (!this.live || this.running.size === 0) return;
    const parts = [...this.running].map(([name, start]) =>
      `${name} ${paint("90", formatSeconds(this.now() - start), this.color)}`
    );
    this.out.write(`\r\x1b[K${this.clock()} ${paint("36", "…", this.color)} ${parts.join(", ")}`);
  }

  /** Runs one step; its return value is the result text. Failures are recorded and rethrown. */
  async step(name: string, fn: () => Promise<string>): Promise<string> {
    const start = this.now();
    this.running.set(name, start);
    if (this.live) {
      this.draw();
      this.timer ??= setInterval(() => this.draw(), 100);
    }
    try {
      const result = await fn();
      this.finish(name, start, result, true);
      return result;
    } catch (err) {
      this.finish(
        name,
        start,
        err instanceof Error ? err.message.split("\n")[0] : String(err),
        false,
      );
      throw err;
    }
  }

  private finish(name: string, start: number, result: string, ok: boolean): void {
    this.running.delete(name);
    if (this.running.size === 0 && this.timer !== undefined) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
    const ms = this.now() - start;
    this.steps.push({ name, atMs: start - this.t0, ms, result, ok });
    const mark = ok ? paint("32", "✓", this.color) : paint("31", "✗", this.color);
    this.out.write(
      `${this.live ? "\r\x1b[K" : ""}${this.clock()} ${mark} ${name}: ${result} (${
        formatSeconds(ms)
      })\n`,
    );
    this.draw();
  }
}
