/**
 * Production defaults of the control host (the fleet server's machine). devenv passes its own
 * paths instead (flags), so a developer's stack never touches these.
 */

/** The Workload API socket of the SPIRE agent on the control host (the server's own SVID). */
export const CONTROL_AGENT_SOCKET = "/run/k8s4r/control-agent/agent.sock";

/** The fleet server's roles config: which operator may do what (deny by default). */
export const DEFAULT_ROLES_FILE = "/etc/k8s4r/roles.yaml";

/** SPIRE's own default admin socket of `spire-server` (what `operator add` mints through). */
export const DEFAULT_SPIRE_SERVER_SOCKET = "/tmp/spire-server/private/api.sock";

/** Where operators' credentials live: `${XDG_CONFIG_HOME:-~/.config}/k8s4r/operators/`. */
export function operatorsDir(env: Record<string, string | undefined>): string {
  const xdg = env["XDG_CONFIG_HOME"];
  const base = xdg && xdg.startsWith("/") ? xdg : `${env["HOME"] ?? "/root"}/.config`;
  return `${base}/k8s4r/operators`;
}

/** The fleet server's URL for a port: `localhost`, the name its certificate carries. */
export function defaultServerUrl(port: number): string {
  return `https://localhost:${port}`;
}
