/**
 * The broker's SPIFFE identity: Mosquitto's certificate kept a current X.509 SVID of
 * `spiffe://<td>/mqtt-broker`, from a SPIRE agent's Workload API (`k8s4r broker identity` on a
 * broker host; devenv's broker-identity component runs the same code with its own agent).
 *
 * On every update of the X509 source:
 *  - when the SVID differs from the certificate and key on disk, writes them (0600) as one
 *    pair (`writeFilePairAtomic`: the paths are links into a versioned directory whose pointer
 *    is switched once both files are written, so the pair on disk always matches) and sends
 *    Mosquitto SIGHUP (it reloads certificate and key on SIGHUP, so a rotated SVID is
 *    served without a restart). Nothing else sends SIGHUP: the same SVID again, a restart of
 *    this process with the files already current and the broker already told (the status
 *    file's `reloadedSerial`), or a bundle-only update change nothing. Mosquitto 2.0.11 and
 *    2.0.21 both crashed under a SIGHUP every few seconds (tests/ca_rotation_test.ts with
 *    K8S4R_TEST_BROKER_SVID_TTL=20);
 *  - when the trust bundle changed (CA rotation), rewrites the exported CA and restarts
 *    Mosquitto, which does not reload `cafile` on SIGHUP;
 *  - records what it did in its status file (`devenv status` shows it).
 *
 * Why an agent and not `spire-server x509 mint`: the broker then gets its identity exactly as a
 * production workload would (node attestation + workload attestation, renewal by the agent at
 * half-life), and it needs no access to the server's admin socket.
 */
import { createHash, X509Certificate } from "node:crypto";
import { errorMessage } from "../cli/errors.ts";
import type { X509SvidSource } from "../spiffe/source.ts";
import { writeFileAtomic, writeFilePairAtomic } from "../fs/atomic.ts";

export interface BrokerIdentityStatus {
  pid: number;
  spiffeId: string;
  serial: string;
  notAfter: string;
  /** When the current SVID was written. */
  lastRenewal: string;
  renewals: number;
  bundleFingerprint: string;
  bundleChanges: number;
  /** The serial the broker was last told to serve (SIGHUP, restart, or it was not running). */
  reloadedSerial?: string;
  /** SIGHUPs sent by this process. */
  reloads?: number;
  updatedAt: string;
  lastError?: string;
}

export interface BrokerIdentityPaths {
  certFile: string;
  keyFile: string;
  caBundleFile: string;
  statusFile: string;
  trustDomain: string;
}

export interface BrokerControl {
  /** SIGHUP: reload certificate and key. Returns what was done. */
  reload(): Promise<string>;
  /** Stop and start again (new cafile). Returns what was done. */
  restart(): Promise<string>;
}

/** sha256 over the sorted DER of every CA certificate: independent of order and PEM layout. */
export function bundleFingerprint(certs: readonly X509Certificate[]): string {
  const ders = certs.map((c) => createHash("sha256").update(c.raw).digest("hex")).sort();
  return createHash("sha256").update(ders.join(",")).digest("hex");
}

/** Splits concatenated PEM certificates; ignores anything else. */
export function parsePemCerts(pem: string): X509Certificate[] {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  return blocks.map((b) => new X509Certificate(b));
}

export function pemFingerprint(pem: string): string | undefined {
  try {
    const certs = parsePemCerts(pem);
    return certs.length ? bundleFingerprint(certs) : undefined;
  } catch {
    return undefined;
  }
}

export async function readBrokerIdentityStatus(
  file: string,
): Promise<BrokerIdentityStatus | undefined> {
  try {
    const s = JSON.parse(await Deno.readTextFile(file));
    return typeof s?.serial === "string" ? s as BrokerIdentityStatus : undefined;
  } catch {
    return undefined;
  }
}

/** Reacts to source updates, one at a time, in order. */
export class BrokerIdentity {
  private chain: Promise<void> = Promise.resolve();
  private status: BrokerIdentityStatus | undefined;

  constructor(
    private readonly source: X509SvidSource,
    private readonly paths: BrokerIdentityPaths,
    private readonly broker: BrokerControl,
    private readonly log: (line: string) => void,
    private readonly now: () => Date = () => new Date(),
  ) {}

  /** Queues one update; the returned promise settles when it is handled (never rejects). */
  update(): Promise<void> {
    this.chain = this.chain.then(() => this.handle()).catch((err) => {
      this.log(`update failed: ${errorMessage(err)}`);
      if (this.status) {
        this.status.lastError = errorMessage(err);
        return this.writeStatus().catch(() => {});
      }
    });
    return this.chain;
  }

  private async handle(): Promise<void> {
    const svid = this.source.getX509Svid();
    const serial = svid.serialNumber;
    const now = this.now();
    this.status ??= await readBrokerIdentityStatus(this.paths.statusFile);
    const certPem = svid.certChainPem();
    const keyPem = svid.privateKeyPem();
    const [diskCert, diskKey] = await Promise.all([
      Deno.readTextFile(this.paths.certFile).catch(() => undefined),
      Deno.readTextFile(this.paths.keyFile).catch(() => undefined),
    ]);
    const written = diskCert !== certPem || diskKey !== keyPem;
    if (written) {
      // Both at once (a new version, then one pointer switched): a broker (re)started or
      // SIGHUPed at any moment, even after a crash in between, finds a matching pair.
      await writeFilePairAtomic(
        { path: this.paths.keyFile, data: keyPem, mode: 0o600 },
        { path: this.paths.certFile, data: certPem, mode: 0o600 },
      );
      this.log(
        `wrote SVID ${svid.id.toString()} serial ${serial}, expires ${svid.notAfter.toISOString()}`,
      );
    }
    const bundle = this.source.getX509BundleForTrustDomain(this.paths.trustDomain);
    let bundleChanged = false;
    let fp = this.status?.bundleFingerprint ?? "";
    if (bundle) {
      fp = bundleFingerprint(bundle.authorities);
      let current: string | undefined;
      try {
        current = pemFingerprint(await Deno.readTextFile(this.paths.caBundleFile));
      } catch { /* missing: write it */ }
      if (current !== fp) {
        await writeFileAtomic(this.paths.caBundleFile, bundle.toPem(), 0o644, 0o755);
        bundleChanged = true;
        this.log(
          `trust bundle changed (${bundle.authorities.length} CA(s)): exported CA rewritten`,
        );
      }
    }
    let reloads = this.status?.reloads ?? 0;
    // The certificate the broker serves changed only if we wrote new files, or the last ones
    // written were never announced (a previous process stopped in between).
    const tell = written || this.status?.reloadedSerial !== serial;
    if (bundleChanged) {
      this.log(await this.broker.restart());
    } else if (tell) {
      this.log(await this.broker.reload());
      reloads++;
    }
    this.status = {
      pid: Deno.pid,
      spiffeId: svid.id.toString(),
      serial,
      notAfter: svid.notAfter.toISOString(),
      lastRenewal: written || !this.status?.lastRenewal
        ? now.toISOString()
        : this.status.lastRenewal,
      // SVIDs written (a renewal each, the first one excepted), across restarts of this process.
      renewals: written ? (this.status?.renewals ?? -1) + 1 : (this.status?.renewals ?? 0),
      bundleFingerprint: fp,
      bundleChanges: (this.status?.bundleChanges ?? 0) + (bundleChanged ? 1 : 0),
      reloadedSerial: serial,
      reloads,
      updatedAt: now.toISOString(),
    };
    await this.writeStatus();
  }

  private async writeStatus(): Promise<void> {
    await writeFileAtomic(
      this.paths.statusFile,
      JSON.stringify(this.status, null, 2) + "\n",
      0o644,
    );
  }
}
