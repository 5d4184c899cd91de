/**
 * A fake PostgreSQL for unit tests: a TCP listener that speaks the first messages of the
 * frontend/backend protocol (v3) as a real server does, and records what the client sends.
 * It stands for whoever took the port while the real server was down: it answers an SSLRequest
 * with `N` (no TLS), then asks for the password in cleartext (`AuthenticationCleartextPassword`,
 * 'R' code 3) or as MD5 (code 5, with a salt), and keeps every PasswordMessage ('p') it gets.
 * It never authenticates anyone: after a password it sends a FATAL ErrorResponse, as a real
 * server does on a wrong password.
 */
import { Buffer } from "node:buffer";
import { createServer, type Server, type Socket } from "node:net";

export interface FakePostgres {
  port: number;
  /** The payloads of the PasswordMessages received (cleartext, or `md5...`). */
  passwords: string[];
  /** Connections that sent a StartupMessage. */
  startups: number;
  close(): Promise<void>;
}

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n);
  return b;
}

function message(type: string, body: Buffer): Buffer {
  return Buffer.concat([Buffer.from(type), int32(body.length + 4), body]);
}

const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;

export async function startFakePostgres(
  ask: "cleartext" | "md5",
): Promise<FakePostgres> {
  const passwords: string[] = [];
  const sockets = new Set<Socket>();
  const state = { startups: 0 };
  const server: Server = createServer((sock) => {
    sockets.add(sock);
    sock.on("close", () => sockets.delete(sock));
    sock.on("error", () => {});
    let buf = Buffer.alloc(0);
    let started = false;
    sock.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (!started) {
          // Untyped: int32 length (itself included), then the code or protocol version.
          if (buf.length < 8) return;
          const len = buf.readInt32BE(0);
          if (buf.length < len) return;
          const code = buf.readInt32BE(4);
          buf = buf.subarray(len);
          if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
            sock.write("N");
            continue;
          }
          started = true;
          state.startups++;
          sock.write(
            ask === "cleartext"
              ? message("R", int32(3))
              : message("R", Buffer.concat([int32(5), Buffer.from([1, 2, 3, 4])])),
          );
          continue;
        }
        if (buf.length < 5) return;
        const type = String.fromCharCode(buf[0]);
        const len = buf.readInt32BE(1);
        if (buf.length < 1 + len) return;
        const body = buf.subarray(5, 1 + len);
        buf = buf.subarray(1 + len);
        if (type === "p") {
          passwords.push(body.subarray(0, body.indexOf(0)).toString("utf8"));
          const fields = Buffer.concat([
            Buffer.from("SFATAL\0"),
            Buffer.from("C28P01\0"),
            Buffer.from('Mpassword authentication failed for user "x"\0'),
            Buffer.from([0]),
          ]);
          sock.end(message("E", fields));
          return;
        }
        if (type === "X") {
          sock.end();
          return;
        }
      }
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const addr = server.address();
  if (addr === null || typeof addr === "string") throw new Error("fake postgres: no port");
  return {
    port: addr.port,
    passwords,
    get startups() {
      return state.startups;
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
