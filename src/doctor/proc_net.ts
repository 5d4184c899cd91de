/**
 * "Who listens on port N?" without lsof: /proc/net/tcp{,6} lists sockets in LISTEN state (st 0A)
 * with their inode; /proc/PID/fd/* links read `socket:[INODE]`, which names the owning process.
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
  const inodes = new Set(hits.map((h) => `socket:[${h.inode}]`));
  let pids: string[] = [];
  try {
    pids = (await proc.readDir("/proc")).filter((n) => /^\d+$/.test(n));
  } catch { /* no /proc */ }
  // Look at all processes concurrently; stop at the first match.
  const found = await new Promise<{ pid: number; link: string } | undefined>((resolve) => {
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
            const link = await proc.readLink(`/proc/${pid}/fd/${fd}`);
            if (inodes.has(link)) {
              done = true;
              return resolve({ pid: Number(pid), link });
            }
          } catch { /* closed meanwhile */ }
        }
      })().finally(() => {
        if (--pending === 0 && !done) resolve(undefined);
      });
    }
  });
  const hit = found ? hits.find((h) => `socket:[${h.inode}]` === found.link)! : hits[0];
  if (!found) return { address: hit.address, port };
  let comm: string | undefined;
  try {
    comm = (await proc.readText(`/proc/${found.pid}/comm`)).trim();
  } catch { /* exited */ }
  return { address: hit.address, port, pid: found.pid, comm };
}
