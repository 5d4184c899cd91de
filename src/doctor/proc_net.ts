/**
 * "Who listens on port N?" and "who serves this unix socket?" without lsof: /proc/net/tcp{,6}
 * lists sockets in LISTEN state (st 0A) with their inode, /proc/net/unix lists unix sockets with
 * their flags, inode and path; /proc/PID/fd/* links read `socket:[INODE]`, which names the
 * owning process.
 */

export interface ListenSocket {
  address: string;
  port: number;
  inode: number;
}

/** Parses /proc/net/tcp or /proc/net/tcp6 text; returns only listening sockets. */
export function parseProcNetTcp(text: string): ListenSocket[] {
  const out: ListenSocket[] = [];
  for (const line of text.split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10 || f[3] !== "0A") continue;
    const [addrHex, portHex] = f[1].split(":");
    const inode = Number(f[9]);
    if (!addrHex || !portHex || !Number.isFinite(inode)) continue;
    out.push({ address: decodeAddress(addrHex), port: parseInt(portHex, 16), inode });
  }
  return out;
}

/** Every listening TCP socket of the host (IPv4 and IPv6), read now. */
export function listeningSockets(): ListenSocket[] {
  const out: ListenSocket[] = [];
  for (const f of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    try {
      out.push(...parseProcNetTcp(Deno.readTextFileSync(f)));
    } catch { /* no IPv6 on this host */ }
  }
  return out;
}

/** 127.0.0.0/8, ::1 and IPv4-mapped loopback. */
export function isLoopbackAddress(address: string): boolean {
  return address === "::1" || /^(::ffff:)?127\./.test(address);
}

/** The kernel prints each 32-bit word of the address in host (little-endian) byte order. */
export function decodeAddress(hex: string): string {
  const words: number[][] = [];
  for (let i = 0; i < hex.length; i += 8) {
    const w = hex.slice(i, i + 8);
    const bytes = [0, 2, 4, 6].map((j) => parseInt(w.slice(j, j + 2), 16)).reverse();
    words.push(bytes);
  }
  const bytes = words.flat();
  if (bytes.length === 4) return bytes.join(".");
  // IPv4-mapped IPv6 (::ffff:a.b.c.d)
  if (bytes.slice(0, 10).every((b) => b === 0) && bytes[10] === 0xff && bytes[11] === 0xff) {
    return `::ffff:${bytes.slice(12).join(".")}`;
  }
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((bytes[i] << 8) | bytes[i + 1]).toString(16));
  // Compress the longest run of zero groups.
  let best = -1, bestLen = 0;
  for (let i = 0; i < 8;) {
    if (groups[i] !== "0") {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === "0") j++;
    if (j - i > bestLen) [best, bestLen] = [i, j - i];
    i = j;
  }
  if (bestLen < 2) return groups.join(":");
  return `${groups.slice(0, best).join(":")}::${groups.slice(best + bestLen).join(":")}`;
}

export interface ProcReader {
  readText(path: string): Promise<string>;
  readDir(path: string): Promise<string[]>;
  readLink(path: string): Promise<string>;
}

/** A listening unix socket of /proc/net/unix. */
export interface UnixListenSocket {
  path: string;
  inode: number;
}

/** `__SO_ACCEPTCON` in the Flags column: the socket is listening. */
const SO_ACCEPTCON = 0x10000;

/** Parses /proc/net/unix text; returns only listening sockets that have a path. */
export function parseProcNetUnix(text: string): UnixListenSocket[] {
  const out: UnixListenSocket[] = [];
  for (const line of text.split("\n").slice(1)) {
    // Num RefCount Protocol Flags Type St Inode Path (the path may hold spaces).
    const m = /^\s*\S+:\s+\S+\s+\S+\s+([0-9A-Fa-f]+)\s+\S+\s+\S+\s+(\d+)\s+(.+)$/.exec(line);
    if (!m || !(parseInt(m[1], 16) & SO_ACCEPTCON)) continue;
    out.push({ path: m[3], inode: Number(m[2]) });
  }
  return out;
}

/** The first process holding one of these socket inodes (concurrent scan of /proc/PID/fd). */
async function findInodeOwner(
  inodes: number[],
  proc: ProcReader,
): Promise<{ pid: number; inode: number } | undefined> {
  const links = new Map(inodes.map((i) => [`socket:[${i}]`, i]));
  let pids: string[] = [];
  try {
    pids = (await proc.readDir("/proc")).filter((n) => /^\d+$/.test(n));
  } catch { /* no /proc */ }
  return await new Promise((resolve) => {
    let pending = pids.length;
    if (!pending) return resolve(undefined);
    let done = false;
    for (const pid of pids) {
      (async () => {
        let fds: string[] = [];
        try {
          fds = await proc.readDir(`/proc/${pid}/fd`);
        } catch { /* gone, or not ours */ }
        for (const fd of fds) {
          if (done) return;
          try {
            const inode = links.get(await proc.readLink(`/proc/${pid}/fd/${fd}`));
            if (inode !== undefined) {
              done = true;
              return resolve({ pid: Number(pid), inode });
            }
          } catch { /* closed meanwhile */ }
        }
      })().finally(() => {
        if (--pending === 0 && !done) resolve(undefined);
      });
    }
  });
}

/** The pid serving the listening unix socket at `path`, if visible to this user. */
export async function findUnixSocketOwner(
  path: string,
  proc: ProcReader,
): Promise<number | undefined> {
  let sockets: UnixListenSocket[] = [];
  try {
    sockets = parseProcNetUnix(await proc.readText("/proc/net/unix"));
  } catch { /* no /proc */ }
  const hits = sockets.filter((s) => s.path === path);
  if (!hits.length) return undefined;
  return (await findInodeOwner(hits.map((h) => h.inode), proc))?.pid;
}

/** Finds the listening socket for a port and, if permitted, the process holding it. */
export async function findListeningOwner(
  port: number,
  proc: ProcReader,
): Promise<{ address: string; port: number; pid?: number; comm?: string } | undefined> {
  const sockets: ListenSocket[] = [];
  for (const f of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    try {
      sockets.push(...parseProcNetTcp(await proc.readText(f)));
    } catch { /* no IPv6, or no /proc */ }
  }
  const hits = sockets.filter((s) => s.port === port);
  if (!hits.length) return undefined;
  const found = await findInodeOwner(hits.map((h) => h.inode), proc);
  const hit = found ? hits.find((h) => h.inode === found.inode)! : hits[0];
  if (!found) return { address: hit.address, port };
  let comm: string | undefined;
  try {
    comm = (await proc.readText(`/proc/${found.pid}/comm`)).trim();
  } catch { /* exited */ }
  return { address: hit.address, port, pid: found.pid, comm };
}
