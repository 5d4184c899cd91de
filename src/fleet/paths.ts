/**
 * Production defaults for the files k8s4r keeps at run time, under /run/k8s4r/ (a tmpfs owned by
 * root; a service manager creates the subdirectory of each component with its owner, e.g.
 * systemd's `RuntimeDirectory=k8s4r/spire-agent`). devenv uses the guide's /tmp/spire-agent/
 * instead. Either way a socket directory must belong to its user (or root) and be writable by
 * nobody else (src/spire/socket_dir.ts).
 */

export const RUN_DIR = "/run/k8s4r";

/** The robot's SPIRE agent Workload API socket (the k8s4r agent's default `spire.socketPath`). */
export const DEFAULT_AGENT_SOCKET = `${RUN_DIR}/spire-agent/agent.sock`;
