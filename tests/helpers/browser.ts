/**
 * A real browser for the dashboard tests: Debian's Chromium (`/usr/bin/chromium`, or
 * `$K8S4R_CHROMIUM`) driven by npm `puppeteer-core` (pinned; it downloads no browser), headless,
 * with a fresh profile in a temp dir.
 *
 * The fleet server's certificate is a SPIRE SVID, whose CA no browser trusts by default. The
 * test browser trusts it the way a person's would: the SPIRE bundle's CAs are imported into an
 * NSS database (`certutil`, Debian's libnss3-tools) at `$HOME/.pki/nssdb` of a HOME made for this
 * browser alone (Chromium on Linux reads its user trust store there), with the trust flags of
 * a CA for TLS servers (`C,,`). No certificate error is ignored: a browser without the import
 * refuses the dashboard (`ERR_CERT_AUTHORITY_INVALID`), which the tests check too.
 */
import puppeteer, { type Browser } from "puppeteer-core";
import { decodePem, encodePem } from "../../src/spiffe/pem.ts";

export const CHROMIUM = Deno.env.get("K8S4R_CHROMIUM") || "/usr/bin/chromium";
export const CERTUTIL = Deno.env.get("K8S4R_CERTUTIL") || "certutil";

/** The flags that work on this machine (no sandbox as root, no GPU, nothing phoning home). */
export const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

async function run(cmd: string, args: string[], env: Record<string, string>): Promise<string> {
  let out;
  try {
    out = await new Deno.Command(cmd, { args, env, stdout: "piped", stderr: "piped" }).output();
  } catch (err) {
    throw new Error(
      `${cmd}: ${
        (err as Error).message
      }: the browser tests need Debian's libnss3-tools (certutil) to trust the fleet's CA`,
    );
  }
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`${cmd} ${args.join(" ")}: exit ${out.code}: ${text}`);
  return text;
}

/** A NSS database in `home/.pki/nssdb` trusting each CA of `bundlePem` for TLS servers. */
export async function trustStore(home: string, bundlePem: string): Promise<string[]> {
  const db = `${home}/.pki/nssdb`;
  await Deno.mkdir(db, { recursive: true, mode: 0o700 });
  const env = { HOME: home, PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin" };
  await run(CERTUTIL, ["-N", "-d", `sql:${db}`, "--empty-password"], env);
  const names: string[] = [];
  const cas = decodePem(bundlePem).filter((b) => b.type === "CERTIFICATE");
  for (const [i, ca] of cas.entries()) {
    const file = `${home}/ca-${i}.pem`;
    await Deno.writeTextFile(file, encodePem("CERTIFICATE", ca.der));
    const name = `k8s4r fleet CA ${i + 1}`;
    await run(CERTUTIL, ["-A", "-d", `sql:${db}`, "-n", name, "-t", "C,,", "-i", file], env);
    names.push(name);
  }
  return names;
}

export interface TestBrowser {
  browser: Browser;
  home: string;
  close(): Promise<void>;
}

/**
 * Launches Chromium with a fresh profile and HOME; with `trustBundlePem` its NSS store trusts
 * those CAs. Everything is removed by `close()`, and the browser process is gone after it.
 */
export async function launchBrowser(opts: { trustBundlePem?: string } = {}): Promise<TestBrowser> {
  try {
    await Deno.stat(CHROMIUM);
  } catch {
    throw new Error(`${CHROMIUM} not found: install Debian's chromium (or set K8S4R_CHROMIUM)`);
  }
  const home = await Deno.makeTempDir({ prefix: "k8s4r-browser-" });
  if (opts.trustBundlePem) await trustStore(home, opts.trustBundlePem);
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [...CHROMIUM_FLAGS, `--user-data-dir=${home}/profile`],
    env: { ...Deno.env.toObject(), HOME: home },
  });
  return {
    browser,
    home,
    async close() {
      const pid = browser.process()?.pid;
      await browser.close().catch(() => {});
      if (pid !== undefined) {
        try {
          Deno.kill(pid, "SIGKILL");
        } catch { /* gone, as it should be */ }
      }
      await Deno.remove(home, { recursive: true }).catch(() => {});
    },
  };
}

/** Where screenshots go: `$K8S4R_TEST_ARTIFACTS`, else a kept temp dir. Printed once. */
export async function artifactsDir(name: string): Promise<string> {
  const base = Deno.env.get("K8S4R_TEST_ARTIFACTS");
  let dir: string;
  if (base) {
    dir = `${base}/${name}`;
    await Deno.mkdir(dir, { recursive: true });
  } else {
    dir = await Deno.makeTempDir({ dir: "/tmp", prefix: `k8s4r-${name}-` });
  }
  console.log(`TEST-ARTIFACTS ${dir}`);
  return dir;
}
