/**
 * Test support for the HTTPS API: a test CA standing in for SPIRE, the fleet server's SVID
 * (`spiffe://<td>/fleet-server`, DNS localhost) in a `StaticX509Source` (rotate it with
 * `rotate()`), operator SVIDs, and a fetch that presents one of them. Not used by production
 * code.
 */
import { X509Bundle, X509BundleSet } from "../spiffe/bundle.ts";
import { StaticX509Source } from "../spiffe/source.ts";
import { parseX509SvidPem } from "../spiffe/svid.ts";
import { type IssuedCert, TestCa } from "../spiffe/testing/test_ca.ts";
import { fleetServerSpiffeId, operatorSpiffeId } from "../fleet/ids.ts";
import type { HttpsOptions } from "./fleet_server.ts";
import { svidServerTls } from "./https.ts";
import type { DownSigner, Incoming } from "./fleet.ts";
import { encode } from "../mqtt/messages.ts";
import { type Role, type RolesSource, staticRoles } from "./roles.ts";

export const TEST_TD = "k8s4r.test";

/**
 * Plain JSON, no signature: for unit tests of the server's logic that read what it publishes.
 * Production code has no unsigned signer (the server signs with its SVID, `TaskSigner`).
 */
export const UNSIGNED: DownSigner = { sign: (msg) => encode(msg) };

/**
 * A robot's `up/heartbeat` as the broker hands it to `FleetService.handleBatch`. Defaults: sent
 * now, boot "b", an SVID valid for an hour, no load.
 */
export function heartbeatMessage(
  robotId: string,
  seq: number,
  o: { ts?: string; bootId?: string; svidExpiresAt?: string; load?: number[] } = {},
): Incoming {
  return {
    topic: `k8s4r/robots/${robotId}/up/heartbeat`,
    payload: new TextEncoder().encode(JSON.stringify({
      v: 1,
      type: "heartbeat",
      robotId,
      ts: o.ts ?? new Date().toISOString(),
      seq,
      bootId: o.bootId ?? "b",
      svidExpiresAt: o.svidExpiresAt ?? new Date(Date.now() + 3600_000).toISOString(),
      load: o.load,
    })),
  };
}

export class TestHttps {
  readonly ca: TestCa;
  readonly source: StaticX509Source;
  readonly admin: IssuedCert;
  #clients = new Map<IssuedCert | null, Deno.HttpClient>();

  constructor(readonly trustDomain = TEST_TD, ca?: TestCa) {
    this.ca = ca ?? TestCa.create({ trustDomain });
    this.source = new StaticX509Source(this.serverSvid(), this.bundles());
    this.admin = this.operator("admin");
  }

  private bundles(): X509BundleSet {
    return new X509BundleSet([X509Bundle.fromPem(this.trustDomain, this.ca.rootPem)]);
  }

  private serverSvid(ttlSeconds = 3600) {
    const c = this.ca.issue({
      spiffeId: fleetServerSpiffeId(this.trustDomain),
      dnsNames: ["localhost"],
      ttlSeconds,
    });
    return parseX509SvidPem(c.chainPem, c.keyPem);
  }

  /** A new server SVID from the same CA (what a SPIRE rotation looks like). */
  rotate(): void {
    this.source.set(this.serverSvid());
  }

  /** A new CA: the bundle changes too (SPIRE's CA rotation, old CA dropped). */
  rotateCa(ca: TestCa): void {
    (this as { ca: TestCa }).ca = ca;
    this.source.set(this.serverSvid(), this.bundles());
    this.close(); // clients trusted the old CA
  }

  operator(name: string, opts: { ttlSeconds?: number } = {}): IssuedCert {
    return this.ca.issue({
      spiffeId: operatorSpiffeId(this.trustDomain, name),
      ttlSeconds: opts.ttlSeconds,
    });
  }

  /** `FleetServer`'s http options on a free loopback port. */
  options(roles: RolesSource = staticRoles({ admin: "operator" })): HttpsOptions {
    return {
      hostname: "127.0.0.1",
      port: 0,
      tls: svidServerTls(this.source),
      bundles: this.source,
      roles,
      trustDomain: this.trustDomain,
      dnsNames: () => this.source.getX509Svid().dnsNames,
    };
  }

  /** A fetch client presenting `cert` (default: admin), trusting the test CA. */
  client(cert: IssuedCert | null = this.admin): Deno.HttpClient {
    let c = this.#clients.get(cert);
    if (!c) {
      c = Deno.createHttpClient({
        caCerts: [this.ca.rootPem],
        ...(cert ? { cert: cert.chainPem, key: cert.keyPem } : {}),
      });
      this.#clients.set(cert, c);
    }
    return c;
  }

  /** fetch as `cert` (default admin; null: no certificate), JSON content type for bodies. */
  async fetch(
    url: string,
    init: RequestInit = {},
    cert: IssuedCert | null = this.admin,
  ): Promise<Response> {
    const headers = new Headers(init.headers);
    if (init.body !== undefined && !headers.has("content-type")) {
      headers.set("content-type", "application/json");
    }
    return await fetch(url, { ...init, headers, client: this.client(cert) });
  }

  async json(url: string, init: RequestInit = {}, cert: IssuedCert | null = this.admin) {
    const r = await this.fetch(url, init, cert);
    return { status: r.status, body: await r.json() };
  }

  close(): void {
    for (const c of this.#clients.values()) c.close();
    this.#clients.clear();
  }
}

export function rolesOf(entries: Record<string, Role>): RolesSource {
  return staticRoles(entries);
}

/** Writes an operator's credential directory the way `operator add` does (0700/0600). */
export async function writeTestCredentials(
  env: Record<string, string | undefined>,
  name: string,
  cert: IssuedCert,
  bundlePem: string,
  serverUrl: string,
): Promise<string> {
  const { credentialPaths } = await import("../operator/credentials.ts");
  const p = credentialPaths(env, name);
  await Deno.mkdir(p.dir, { recursive: true, mode: 0o700 });
  const write = (f: string, text: string) => Deno.writeTextFile(f, text, { mode: 0o600 });
  await write(p.cert, cert.chainPem);
  await write(p.key, cert.keyPem);
  await write(p.bundle, bundlePem);
  await write(
    p.meta,
    JSON.stringify({
      name,
      spiffeId: cert.spiffeId,
      serverUrl,
      issuedAt: cert.certificate.validFrom,
      expiresAt: new Date(cert.certificate.validTo).toISOString(),
    }),
  );
  return p.dir;
}
