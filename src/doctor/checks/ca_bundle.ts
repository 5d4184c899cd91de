/** ca-bundle: the exported CA file the broker trusts is present, valid, and SPIRE's current one. */
import { errorMessage } from "../../cli/errors.ts";
import { type Check, type CheckContext, fail, formatDuration, ok, rel } from "../check.ts";
import { certFacts, fingerprint, pemCertificates } from "../pki.ts";
import { fetchSvids, fsHangHint } from "./common.ts";
import { agentTimeout } from "./spire.ts";

function exportCommand(ctx: CheckContext): string {
  return `spire-server bundle show -format pem -socketPath ${ctx.layout.spireServerSocket} > ${
    rel(ctx, ctx.layout.caBundleFile)
  }`;
}

async function readExported(ctx: CheckContext): Promise<Uint8Array[]> {
  return await ctx.memo("exported-bundle", async () => {
    const text = await ctx.fs.readTextFile(ctx.layout.caBundleFile);
    const certs = pemCertificates(text);
    if (!certs.length) throw new Error("holds no PEM certificate");
    return certs;
  });
}

const bundleFile: Check = {
  id: "ca-bundle.file",
  group: "ca-bundle",
  title: "exported CA bundle",
  timeout: { hint: (ctx) => fsHangHint(ctx, ctx.layout.caBundleFile) },
  async run(ctx) {
    const file = rel(ctx, ctx.layout.caBundleFile);
    const st = await ctx.fs.stat(ctx.layout.caBundleFile);
    if (!st) {
      return fail(
        `${file} does not exist`,
        `k8s4r devenv start   # exports it; or: ${exportCommand(ctx)}`,
      );
    }
    let certs: Uint8Array[];
    try {
      certs = await readExported(ctx);
    } catch (err) {
      return fail(`${file}: ${errorMessage(err)}`, `re-export it: ${exportCommand(ctx)}`);
    }
    const now = ctx.clock.now();
    const facts = certs.map(certFacts);
    const notCa = facts.findIndex((f) => !f.isCa);
    if (notCa >= 0) {
      return fail(
        `${file}: certificate ${notCa + 1} is not a CA`,
        `re-export it: ${exportCommand(ctx)}`,
      );
    }
    const valid = facts.filter((f) => f.notBefore <= now && now <= f.notAfter);
    if (!valid.length) {
      return fail(
        `${file}: every CA in it has expired`,
        `re-export it: ${exportCommand(ctx)}   # then restart the broker`,
      );
    }
    const last = Math.max(...valid.map((f) => f.notAfter));
    return ok(
      `${file}: ${certs.length} CA(s), valid for ${formatDuration(last - now)}`,
      facts.map((f) =>
        `${f.uris[0] ?? f.subject}, not after ${new Date(f.notAfter).toISOString()}`
      ),
    );
  },
};

/** SPIRE's current bundle: from the Workload API, else from `spire-server bundle show`. */
async function currentBundle(ctx: CheckContext): Promise<{ certs: Uint8Array[]; from: string }> {
  try {
    const svids = await fetchSvids(ctx);
    if (svids.length && svids[0].bundle.length) {
      return { certs: svids[0].bundle, from: "the Workload API" };
    }
  } catch { /* fall back to the server */ }
  const bins = await ctx.memo("spire-binaries", () => ctx.spire.findBinaries()).catch(() =>
    undefined
  );
  const r = await ctx.runner.output(
    bins?.server ?? "spire-server",
    ["bundle", "show", "-format", "pem", "-socketPath", ctx.layout.spireServerSocket],
    { timeoutMs: ctx.timeoutMs, signal: ctx.signal },
  );
  return { certs: pemCertificates(r.stdout), from: "spire-server bundle show" };
}

const bundleCurrent: Check = {
  id: "ca-bundle.current",
  group: "ca-bundle",
  title: "exported bundle is SPIRE's current bundle",
  // SPIRE's bundle comes from the robot's spire-agent (Workload API) first.
  timeout: agentTimeout,
  dependsOn: ["ca-bundle.file"],
  async run(ctx) {
    const file = rel(ctx, ctx.layout.caBundleFile);
    const exported = await readExported(ctx);
    let cur;
    try {
      cur = await currentBundle(ctx);
    } catch (err) {
      return fail(
        `cannot read SPIRE's bundle (Workload API and spire-server both failed): ${
          errorMessage(err)
        }`,
        "k8s4r devenv start",
      );
    }
    const have = new Set(exported.map(fingerprint));
    const want = new Set(cur.certs.map(fingerprint));
    const missing = [...want].filter((f) => !have.has(f));
    const extra = [...have].filter((f) => !want.has(f));
    if (missing.length || extra.length) {
      return fail(
        `${file} is stale: ${missing.length} CA(s) missing, ${extra.length} no longer in SPIRE's bundle (from ${cur.from})`,
        `k8s4r devenv start   # re-exports and restarts the broker; or: ${
          exportCommand(ctx)
        } and restart mosquitto (it does not reload cafile on SIGHUP)`,
        [
          ...missing.map((f) => `missing sha256:${f.slice(0, 16)}`),
          ...extra.map((f) => `extra sha256:${f.slice(0, 16)}`),
        ],
      );
    }
    return ok(`${file} matches the ${want.size} CA(s) from ${cur.from}`);
  },
};

export const caBundleChecks: Check[] = [bundleFile, bundleCurrent];
