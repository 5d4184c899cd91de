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
  private closed = false;

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
    const pump = async (from: Deno.Conn, to: Deno.Conn) => {
      const buf = new Uint8Array(64 * 1024);
      try {
        for (;;) {
          await this.gate();
          const n = await from.read(buf);
          if (n === null) break;
          await this.gate(); // frozen meanwhile: hold what was read
          let off = 0;
          while (off < n) off += await to.write(buf.subarray(off, n));
        }
      } catch { /* one side closed */ }
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
