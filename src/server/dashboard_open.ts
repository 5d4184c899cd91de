/**
 * How `k8s4r dashboard` hands its one-time login URL to the desktop's browser without putting
 * it on a command line: every local user can read every process's argv (`ps`, /proc/PID/
 * cmdline) and could redeem the token before the browser does.
 *
 * The URL goes into a small HTML page (0600, in a fresh 0700 directory) that sends the browser
 * on to it; `xdg-open` gets only that file's path. The page is removed as soon as the server
 * says the login was used (or expired), or when the command is interrupted: it holds a secret
 * only for as long as it is any use.
 */
import { join } from "node:path";
import { errorMessage } from "../cli/errors.ts";
import type { Io } from "../cli/io.ts";
import { waitFor } from "../process/mod.ts";

/** What the server says of a login (`GET /api/dashboard/logins/{id}`). */
export type LoginState = "pending" | "used" | "expired" | "unknown";

export interface OpenedLogin {
  /** xdg-open succeeded. */
  opened: boolean;
  /** The login's state when the command stopped waiting (undefined: not opened, or aborted). */
  state?: LoginState;
}

function esc(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** The page that sends a browser on to `url` (no script: a meta refresh, and a link). */
export function loginRedirectPage(url: string): string {
  const u = esc(url);
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<meta http-equiv="refresh" content="0;url=${u}"><title>k8s4r dashboard</title></head>
<body><p><a href="${u}">Open the k8s4r dashboard</a></p></body></html>
`;
}

/**
 * Opens `url` through a private redirect page, then waits (polling `state`, at most until
 * `expiresAt`) for the browser to use the login, and removes the page.
 */
export async function openLogin(
  url: string,
  io: Pick<Io, "runner" | "stderr" | "signal">,
  opts: { expiresAt: number; state: () => Promise<LoginState>; pollMs?: number },
): Promise<OpenedLogin> {
  // makeTempDir creates the directory 0700; chmod in case a umask or a platform differs.
  const dir = await Deno.makeTempDir({ prefix: "k8s4r-dashboard-" });
  try {
    await Deno.chmod(dir, 0o700);
    const file = join(dir, "login.html");
    await Deno.writeTextFile(file, loginRedirectPage(url), { mode: 0o600, createNew: true });
    await Deno.chmod(file, 0o600);
    const opened = await io.runner.output("xdg-open", [file], {
      check: false,
      timeoutMs: 15_000,
      signal: io.signal,
    }).catch((err) => ({ code: -1, stdout: "", stderr: errorMessage(err) }));
    if (opened.code !== 0) {
      io.stderr.write(
        `k8s4r: could not open a browser (xdg-open: ${
          opened.stderr.trim().split("\n").pop() || `exit ${opened.code}`
        }): open the URL yourself\n`,
      );
      return { opened: false };
    }
    io.stderr.write(
      `k8s4r: waiting for the browser to use the login (until ${
        new Date(opts.expiresAt).toLocaleTimeString()
      }; Ctrl-C stops waiting)\n`,
    );
    let state = "pending" as LoginState;
    try {
      await waitFor(async () => {
        state = await opts.state();
        return state !== "pending";
      }, {
        timeoutMs: Math.max(0, opts.expiresAt - Date.now()) + 1000,
        intervalMs: opts.pollMs ?? 500,
        signal: io.signal,
        what: "the browser to use the login",
      });
    } catch {
      if (io.signal.aborted) return { opened: true };
      state = "expired";
    }
    io.stderr.write(
      state === "used"
        ? "k8s4r: the browser logged in\n"
        : `k8s4r: the login was not used (${state}): run k8s4r dashboard again\n`,
    );
    return { opened: true, state };
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}
