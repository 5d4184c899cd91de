/**
 * A loopback TCP proxy for fault tests: one client's path to a server, which the test can
 * `freeze()` (no byte moves either way, connections stay open: a network that stops
 * delivering; TCP holds the bytes, nothing is lost or reordered) and `thaw()`.
 */
import { freePorts } from "./ports.ts";

export class TcpProxy {
  readonly port: number;
  private listener: Deno.Listener;
  private frozen = false;
  private waiters: (() => void)[] = [];
  private readonly conns = new Set<Deno.Conn>();
  /** Client side of each open pair, to its server side (`severClients`). */
  private readonly pairs = new Map<Deno.Conn, Deno.Conn>();
  /** Server sides left open by `severClients`, until the server closes them. */
  private readonly orphans = new Set<Deno.Conn>();
  private closed = false;
  /** Connections accepted so far (each is one client connection). */
  accepted = 0;
  /** Server-side closes of severed connections seen so far (the server ended them). */
  orphansClosedByServer = 0;

  private constructor(private readonly target: { hostname: string; port: number }) {
    [this.port] = freePorts(1);
    this.listener = Deno.listen({ hostname: "127.0.0.1", port: this.port });
    void this.accept();
  }

  static start(target: { hostname: string; port: number }): TcpProxy {
    return new TcpProxy(target);
  }

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  private async accept(): Promise<void> {
    for (;;) {
      let c: Deno.Conn;
      try {
        c = await this.listener.accept();
      } catch {
        return; // closed
      }
      void this.pipeBoth(c);
    }
  }

  private async pipeBoth(client: Deno.Conn): Promise<void> {
    let server: Deno.Conn;
    try {
      server = await Deno.connect(this.target);
    } catch {
      client.close();
      return;
    }
    this.conns.add(client);
    this.conns.add(server);
    this.accepted++;
    this.pairs.set(client, server);
    const pump = async (from: Deno.Conn, to: Deno.Conn) => {
      const buf = new Uint8Array(64 * 1024);
      try {
        for (;;) {
          await this.gate();
          const n = await from.read(buf);
          if (n === null) break;
          await this.gate(); // frozen meanwhile: hold what was read
          if (this.orphans.has(from)) continue; // severed: the server's bytes go nowhere
          let off = 0;
          while (off < n) off += await to.write(buf.subarray(off, n));
        }
      } catch {
        // One side closed; a write to a client severed meanwhile: the server side is read on.
        if (this.orphans.has(from)) {
          try {
            while ((await from.read(buf)) !== null) { /* discarded */ }
          } catch { /* reset by the server */ }
        }
      }
      if (this.orphans.has(from)) {
        // The server ended a severed connection.
        this.orphans.delete(from);
        this.conns.delete(from);
        if (!this.closed) this.orphansClosedByServer++;
        try {
          from.close();
        } catch { /* closed already */ }
        return;
      }
      if (this.orphans.has(to)) return; // the severed client's side: its server side stays
      this.pairs.delete(from);
      for (const c of [from, to]) {
        if (this.conns.delete(c)) {
          try {
            c.close();
          } catch { /* closed already */ }
        }
      }
    };
    await Promise.all([pump(client, server), pump(server, client)]);
  }

  private gate(): Promise<void> {
    if (!this.frozen) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /**
   * Closes the client side of every open connection and keeps its server side open, silent: the
   * client sees its connection end, the server still holds it (a half-open TCP connection, as a
   * NAT or Wi-Fi drop leaves). A new connection of the client passes as usual.
   */
  severClients(): void {
    for (const [client, server] of this.pairs) {
      this.orphans.add(server);
      this.conns.delete(client);
      try {
        client.close();
      } catch { /* closed already */ }
    }
    this.pairs.clear();
  }

  freeze(): void {
    this.frozen = true;
  }

  thaw(): void {
    this.frozen = false;
    for (const w of this.waiters.splice(0)) w();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.thaw();
    try {
      this.listener.close();
    } catch { /* closed */ }
    for (const c of this.conns) {
      try {
        c.close();
      } catch { /* closed */ }
    }
    this.conns.clear();
  }
}
