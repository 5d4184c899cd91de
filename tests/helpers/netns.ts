/**
 * A multi-host test network: robot hosts as Linux network namespaces, each linked to the control
 * host (the root namespace) by its own veth pair, with addresses from 10.203.0.0/16, a private
 * range nothing else on our machines uses. Host `n` of a network gets the /24 `10.203.N.0`: the
 * control host's end is `10.203.N.1`, the robot's `10.203.N.2`. A robot host reaches the control
 * host's end of its own link and nothing else (no default route, no forwarding).
 *
 * Names carry this test run's id (`k8s4r-<run>-<i>` for namespaces, `k4<run><i>h`/`...r` for the
 * 15-character interface names), so cleanup never touches another run's: `close()` kills what
 * still runs inside the namespace (our own children, by pid from `ip netns pids`), deletes the
 * namespace (which destroys the veth pair) and the control-side link; a module-level `unload`
 * listener does the same, synchronously, for anything a failed test left, and `sweepRun()`
 * removes whatever carries this run's prefix.
 *
 * A control host that serves several robot hosts at ONE address (`devenv start --advertise
 * ADDR`) gets it from `addControlAddress()`: a /32 on an interface of the root namespace (one end
 * of a veth pair whose both ends stay there: the kernel here has no `dummy` module),
 * which each robot host reaches over its own link (a host route through its veth; the root
 * namespace answers ARP for any of its addresses). Pulling one robot's cable then cuts that robot
 * only.
 *
 * A command runs in a host through `exec` (`ip netns exec NS`, which remounts /sys, then a mount
 * of cgroup2 at /sys/fs/cgroup as a robot host has it).
 *
 * Needs root (`ip netns` works as root on our machines and in CI). Nothing here listens.
 */
import { realRunner, waitFor } from "../../src/process/mod.ts";

export const TEST_RANGE = "10.203.0.0/16";
/** This process's run id: 5 hex digits, in every name it creates. */
export const RUN_ID = crypto.getRandomValues(new Uint8Array(3)).reduce(
  (s, b) => s + b.toString(16).padStart(2, "0"),
  "",
).slice(0, 5);
const NS_PREFIX = `k8s4r-${RUN_ID}-`;
const LINK_PREFIX = `k4${RUN_ID}`;

export interface RobotHost {
  /** The namespace's name. */
  ns: string;
  /** The control host's address on this link (bind servers here for this robot host). */
  controlAddress: string;
  /** The robot host's own address. */
  address: string;
  /** The veth end in the root namespace (pull this one's cable) and in the robot's. */
  hostLink: string;
  nsLink: string;
  /** argv prefix that runs a command inside the robot host. */
  exec: string[];
}

async function ip(args: string[]): Promise<string> {
  const r = await realRunner.output("ip", args, { timeoutMs: 10_000, check: false });
  if (r.code !== 0) throw new Error(`ip ${args.join(" ")}: ${r.stderr.trim() || `exit ${r.code}`}`);
  return r.stdout;
}

function ipSync(args: string[]): { code: number; stdout: string } {
  try {
    const r = new Deno.Command("ip", { args, stdout: "piped", stderr: "null" }).outputSync();
    return { code: r.code, stdout: new TextDecoder().decode(r.stdout) };
  } catch {
    return { code: -1, stdout: "" };
  }
}

/** Our processes still inside a namespace. */
function pidsIn(ns: string): number[] {
  const r = ipSync(["netns", "pids", ns]);
  return r.code === 0 ? r.stdout.split(/\s+/).filter(Boolean).map(Number) : [];
}

/** Synchronous cleanup of every namespace and link of this run (unload, or after a failure). */
export function sweepRun(): string[] {
  const removed: string[] = [];
  const list = ipSync(["netns", "list"]).stdout.split("\n").map((l) => l.split(" ")[0]);
  for (const ns of list) {
    if (!ns.startsWith(NS_PREFIX)) continue;
    for (const pid of pidsIn(ns)) {
      try {
        Deno.kill(pid, "SIGKILL"); // started by this run, inside this run's namespace
      } catch { /* gone */ }
    }
    if (ipSync(["netns", "del", ns]).code === 0) removed.push(ns);
  }
  const links = ipSync(["-o", "link", "show"]).stdout.split("\n");
  for (const l of links) {
    const name = /^\d+: ([^:@]+)[@:]/.exec(l)?.[1];
    if (name?.startsWith(LINK_PREFIX) && ipSync(["link", "del", name]).code === 0) {
      removed.push(name);
    }
  }
  return removed;
}

const live = new Set<TestNetwork>();
globalThis.addEventListener("unload", () => {
  if (live.size) sweepRun();
});

/** The /24 numbers (third octet) some interface here already uses in the test range. */
async function usedSubnets(): Promise<Set<number>> {
  const out = await ip(["-o", "-4", "addr", "show"]);
  const used = new Set<number>();
  for (const m of out.matchAll(/inet 10\.203\.(\d+)\./g)) used.add(Number(m[1]));
  return used;
}

export class TestNetwork {
  readonly hosts: RobotHost[] = [];
  /** The shared control address (`addControlAddress`), if any. */
  shared: { address: string; link: string } | undefined;
  private closed = false;

  private constructor() {
    live.add(this);
  }

  static async create(): Promise<TestNetwork> {
    if (Deno.uid() !== 0) {
      throw new Error("the multi-host test network needs root (ip netns); run the tests as root");
    }
    await ip(["netns", "list"]).catch((err) => {
      throw new Error(`ip netns does not work here: ${(err as Error).message}`);
    });
    return new TestNetwork();
  }

  /**
   * One address of the control host that every robot host added after this reaches over its
   * own link: `10.203.N.1/32` on a veth pair of its own in the root namespace.
   */
  async addControlAddress(): Promise<string> {
    if (this.shared) return this.shared.address;
    const used = await usedSubnets();
    const free = Array.from({ length: 254 }, (_, k) => k + 1).filter((n) => !used.has(n));
    if (!free.length) throw new Error(`no free /24 left in ${TEST_RANGE}`);
    const n = free[Math.floor(Math.random() * free.length)];
    const link = `${LINK_PREFIX}c`;
    const address = `10.203.${n}.1`;
    this.shared = { address, link };
    await ip(["link", "add", link, "type", "veth", "peer", "name", `${LINK_PREFIX}d`]);
    await ip(["addr", "add", `${address}/32`, "dev", link]);
    await ip(["link", "set", link, "up"]);
    await ip(["link", "set", `${LINK_PREFIX}d`, "up"]);
    return address;
  }

  /** A new robot host, linked and addressed, its loopback up. */
  async addHost(): Promise<RobotHost> {
    const i = this.hosts.length;
    const ns = `${NS_PREFIX}${i}`;
    const hostLink = `${LINK_PREFIX}${i}h`;
    const nsLink = `${LINK_PREFIX}${i}r`;
    // A /24 no interface uses yet (other test runs may hold some), picked at random.
    const used = await usedSubnets();
    const free = Array.from({ length: 254 }, (_, k) => k + 1).filter((n) => !used.has(n));
    if (!free.length) throw new Error(`no free /24 left in ${TEST_RANGE}`);
    const n = free[Math.floor(Math.random() * free.length)];
    const host: RobotHost = {
      ns,
      controlAddress: `10.203.${n}.1`,
      address: `10.203.${n}.2`,
      hostLink,
      nsLink,
      // `ip netns exec` gives the command a fresh sysfs without the cgroup mounts a real host has:
      // mount cgroup2 there again (its own mount namespace), so an agent inside contains its tasks
      // as on a robot. Then exec: the pid stays the command's.
      exec: [
        "ip",
        "netns",
        "exec",
        ns,
        "sh",
        "-c",
        'mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null; exec "$@"',
        "sh",
      ],
    };
    this.hosts.push(host);
    await ip(["netns", "add", ns]);
    await ip(["link", "add", hostLink, "type", "veth", "peer", "name", nsLink]);
    await ip(["link", "set", nsLink, "netns", ns]);
    await ip(["addr", "add", `${host.controlAddress}/24`, "dev", hostLink]);
    await ip(["link", "set", hostLink, "up"]);
    await ip(["-n", ns, "addr", "add", `${host.address}/24`, "dev", nsLink]);
    await ip(["-n", ns, "link", "set", nsLink, "up"]);
    await ip(["-n", ns, "link", "set", "lo", "up"]);
    if (this.shared) {
      await ip(["-n", ns, "route", "add", `${this.shared.address}/32`, "dev", nsLink]);
    }
    await this.waitCarrier(host, true);
    return host;
  }

  /** Pulls the robot host's cable: its link goes down at the control host's end. */
  async pullCable(h: RobotHost): Promise<void> {
    await ip(["link", "set", h.hostLink, "down"]);
    await this.waitCarrier(h, false);
  }

  async plugCable(h: RobotHost): Promise<void> {
    await ip(["link", "set", h.hostLink, "up"]);
    await this.waitCarrier(h, true);
  }

  /** Waits until the robot's end sees (or lost) the carrier: the link state, not a timer. */
  private async waitCarrier(h: RobotHost, up: boolean): Promise<void> {
    await waitFor(
      async () => {
        const out = await ip(["-n", h.ns, "-o", "link", "show", h.nsLink]);
        const hasCarrier = /state UP/.test(out) && !/NO-CARRIER/.test(out);
        return hasCarrier === up;
      },
      { timeoutMs: 10_000, intervalMs: 50, what: `${h.nsLink} carrier ${up ? "up" : "down"}` },
    );
  }

  /** Kills what still runs inside the namespaces, deletes them and their links. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const h of this.hosts) {
      for (const pid of pidsIn(h.ns)) {
        try {
          Deno.kill(pid, "SIGKILL");
        } catch { /* gone */ }
      }
      await ip(["netns", "del", h.ns]).catch(() => {});
      await ip(["link", "del", h.hostLink]).catch(() => {}); // gone with the namespace, usually
    }
    if (this.shared) await ip(["link", "del", this.shared.link]).catch(() => {});
    live.delete(this);
  }

  /** Names of this run's namespaces and links that still exist (for tests of the cleanup). */
  static async leftovers(): Promise<string[]> {
    const ns = (await ip(["netns", "list"])).split("\n").map((l) => l.split(" ")[0])
      .filter((n) => n.startsWith(NS_PREFIX));
    const links = [...(await ip(["-o", "link", "show"])).matchAll(/^\d+: ([^:@]+)[@:]/gm)]
      .map((m) => m[1]).filter((n) => n.startsWith(LINK_PREFIX));
    return [...ns, ...links];
  }
}
