/**
 * `k8s4r agent service [--install]`: the systemd unit that runs an enrolled robot.
 *
 * Hardening, and what was left out because it would break the agent:
 * - kept: NoNewPrivileges, ProtectSystem=strict (only the state and runtime directories, and
 *   the data dir when one is given, are writable), PrivateTmp, ProtectHome, ProtectKernel*,
 *   ProtectClock, ProtectHostname, RestrictSUIDSGID, RestrictRealtime,
 *   RestrictNamespaces, LockPersonality, RestrictAddressFamilies (unix, IPv4/6, netlink for the
 *   interface list), SystemCallArchitectures=native, UMask=0077.
 * - left out: MemoryDenyWriteExecute (V8 writes and then runs machine code), PrivateDevices (a
 *   task may drive the robot's hardware), PrivateNetwork and IPAddressDeny (the agent dials the
 *   SPIRE server and the broker), a capability bounding set and DynamicUser (the agent switches
 *   tasks to `tasks.user`, which needs root's CAP_SETUID/CAP_SETGID/CAP_SETPCAP), and
 *   ProtectControlGroups (it makes /sys/fs/cgroup read-only: the agent needs to write its
 *   delegated subtree). A task that must write elsewhere gets a drop-in:
 *   `systemctl edit k8s4r-agent` with `[Service]` `ReadWritePaths=/the/path`.
 * - added: Delegate=yes, so that the agent may make one cgroup per task below its own
 *   (task_cgroup.ts) and kill each task whole. The agent runs as root (no User=): it refuses to
 *   start when tasks are allowed and no `tasks.user` is set, so tasks never run as root.
 *
 * KillMode=mixed: systemd sends SIGTERM to the agent only; the agent says offline, disconnects and
 * stops its spire-agent itself, and whatever is left gets SIGKILL after TimeoutStopSec. The
 * tasks' cgroups are below the unit's: when the agent dies (kill -9, a crash), systemd kills
 * what its tasks left before it restarts it.
 */
import { basename, dirname, isAbsolute, join } from "node:path";
import { agentRunArgs, agentV8FlagsEnv } from "./runtime_flags.ts";
import {
  AGENT_UNIT_NAME,
  PRODUCTION_CONFIG_DIR,
  PRODUCTION_RUNTIME_DIR,
  PRODUCTION_STATE_DIR,
} from "../fleet/paths.ts";

export interface UnitOptions {
  /** argv that starts k8s4r: `[/usr/local/bin/k8s4r]` or `[deno, run, -A, /src/main.ts]`. */
  exec: string[];
  /** A data dir other than the production directories (`k8s4r agent --data-dir DIR`). */
  dataDir?: string;
}

/** systemd's quoting for one ExecStart argument. */
function quoteArg(a: string): string {
  if (/^[A-Za-z0-9_@%+=:,./-]+$/.test(a)) return a;
  return `"${a.replace(/\\/g, "\\\\").replace(/"/g, '\\"')}"`;
}

/** How this process was started, as the argv a unit can run: compiled k8s4r, or deno + main.ts. */
export function selfExec(): string[] {
  const exe = Deno.execPath();
  if (basename(exe) === "deno" || basename(exe) === "deno.exe") {
    const main = Deno.mainModule.startsWith("file://")
      ? decodeURIComponent(new URL(Deno.mainModule).pathname)
      : Deno.mainModule;
    // systemd starts it in /, where no deno.json is found: name the project's (import map).
    const config = join(dirname(main), "deno.json");
    let hasConfig = false;
    try {
      hasConfig = Deno.statSync(config).isFile;
    } catch { /* a main.ts without one */ }
    return [exe, "run", "-A", ...(hasConfig ? ["--config", config] : []), main];
  }
  return [exe];
}

export function renderAgentUnit(o: UnitOptions): string {
  for (const a of o.exec.slice(0, 1)) {
    if (!isAbsolute(a)) throw new Error(`the unit needs an absolute executable path, got ${a}`);
  }
  const fromSource = o.exec.length > 1;
  // Running from a source tree in /root or /home: the tree must stay readable.
  const underHome = o.exec.some((a) => /^\/(root|home)(\/|$)/.test(a));
  // From source, the agent's own `deno run` flags (runtime_flags.ts) go after `run`.
  const exec = [o.exec[0], ...agentRunArgs(o.exec.slice(1))];
  const args = [...exec, "agent", ...(o.dataDir ? ["--data-dir", o.dataDir] : [])];
  const lines = [
    "# Written by `k8s4r agent service`. Runs the robot enrolled with `k8s4r agent --enroll`.",
    "[Unit]",
    "Description=k8s4r robot agent (SPIRE agent, X.509 SVID, MQTT over mTLS)",
    // A board without a real-time clock must have its time before it dials out: SVIDs are
    // checked against it.
    "Wants=network-online.target time-sync.target",
    "After=network-online.target time-sync.target",
    "StartLimitIntervalSec=0",
    "",
    "[Service]",
    "Type=simple",
    `ExecStart=${args.map(quoteArg).join(" ")}`,
    `Environment=DENO_V8_FLAGS=${agentV8FlagsEnv(undefined)}`,
    "Environment=NO_COLOR=1",
    ...(fromSource ? [`Environment=DENO_DIR=${PRODUCTION_STATE_DIR}/deno`] : []),
    "Restart=always",
    "RestartSec=5",
    "KillMode=mixed",
    "TimeoutStopSec=30",
    // One cgroup per task below the unit's own (the agent kills each task whole).
    "Delegate=yes",
    `ConfigurationDirectory=${basename(PRODUCTION_CONFIG_DIR)}`,
    "ConfigurationDirectoryMode=0755",
    `StateDirectory=${basename(PRODUCTION_STATE_DIR)}`,
    "StateDirectoryMode=0700",
    `RuntimeDirectory=${basename(PRODUCTION_RUNTIME_DIR)}`,
    "RuntimeDirectoryMode=0755",
    ...(o.dataDir ? [`ReadWritePaths=${quoteArg(o.dataDir)}`] : []),
    "UMask=0077",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    `ProtectHome=${underHome ? "read-only" : "yes"}`,
    "PrivateTmp=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictSUIDSGID=yes",
    "RestrictRealtime=yes",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "SystemCallArchitectures=native",
    "",
    "[Install]",
    "WantedBy=multi-user.target",
    "",
  ];
  return lines.join("\n");
}

export { AGENT_UNIT_NAME };
