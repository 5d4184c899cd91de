/**
 * What a SPIRE agent left in its data directory, read without running it: its own X.509 SVID
 * (the agent SVID), whether SPIRE considers it re-attestable, and the cached trust bundle.
 *
 * SPIRE v1.13.3 (pkg/agent/storage) keeps them in `<data_dir>/agent-data.json`:
 * `{"svid": [<PEM>...], "bundle": [<PEM>...], "reattestable": bool, ...}`, each PEM as base64
 * (Go's []byte), and the agent's key in `keys.json` (disk KeyManager). On start the agent uses
 * that SVID unless it has expired (`IsSVIDExpired`: now + 1 s >= notAfter); an expired one makes
 * it attest again with its NodeAttestor. A join token is single use, so a join-token robot that
 * was off past its agent SVID's lifetime cannot come back by itself; an x509pop robot proves
 * possession of its key again and does (`reattestable` is true for x509pop, false for
 * join_token).
 */
import { Buffer } from "node:buffer";
import { join } from "node:path";
import { decodePemOfType } from "../spiffe/pem.ts";
import { parseCertDer } from "../spiffe/x509.ts";
import { redactJoinTokens } from "./redact.ts";

export interface CertValidity {
  notBefore: Date;
  notAfter: Date;
}

export interface AgentDataState {
  /** An SVID is stored and the agent's keys exist: the agent has attested. */
  attested: boolean;
  /** The agent's SPIFFE ID, with a join token redacted (`.../join_token/<redacted>`). */
  spiffeId?: string;
  /** The node attestor that issued it, from the ID's path: `join_token`, `x509pop`, ... */
  attestor?: string;
  /** SPIRE's flag: the agent can attest again without a new credential. */
  reattestable: boolean;
  /** The agent SVID's leaf. */
  svid?: CertValidity;
  /** The cached bundle's CA certificates. */
  bundle: CertValidity[];
}

function certsOf(v: unknown): Uint8Array[] {
  if (!Array.isArray(v)) return [];
  const out: Uint8Array[] = [];
  for (const item of v) {
    if (typeof item !== "string") continue;
    const text = Buffer.from(item, "base64").toString("utf8");
    out.push(...decodePemOfType(text, "CERTIFICATE"));
  }
  return out;
}

/**
 * Reads `<dataDir>/agent-data.json`. Undefined when there is none (never attested, or another
 * layout); throws when it exists but cannot be read or parsed (a damaged cache).
 */
export async function readAgentData(dataDir: string): Promise<AgentDataState | undefined> {
  let text: string;
  try {
    text = await Deno.readTextFile(join(dataDir, "agent-data.json"));
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
  const data = JSON.parse(text);
  const svid = certsOf(data?.svid);
  const bundle = certsOf(data?.bundle).map((der) => {
    const i = parseCertDer(der);
    return { notBefore: i.notBefore, notAfter: i.notAfter };
  });
  let keys = false;
  try {
    await Deno.stat(join(dataDir, "keys.json"));
    keys = true;
  } catch { /* no key: the agent will make one and attest again */ }
  const state: AgentDataState = {
    attested: svid.length > 0 && keys,
    reattestable: data?.reattestable === true,
    bundle,
  };
  if (svid.length > 0) {
    const leaf = parseCertDer(svid[0]);
    state.svid = { notBefore: leaf.notBefore, notAfter: leaf.notAfter };
    const uri = leaf.uris.find((u) => u.startsWith("spiffe://"));
    if (uri) {
      state.spiffeId = redactJoinTokens(uri);
      state.attestor = /^spiffe:\/\/[^/]+\/spire\/agent\/([^/]+)\//.exec(uri)?.[1];
    }
  }
  return state;
}

/** SPIRE's own rule (pkg/agent/attestor/node IsSVIDExpired): expired 1 s before notAfter. */
export function agentSvidExpired(svid: CertValidity, now: number): boolean {
  return now + 1000 >= svid.notAfter.getTime();
}

export type AgentSvidVerdict =
  /** No stored SVID: the agent attests with its enrollment credential on first start. */
  | { kind: "none" }
  | { kind: "valid"; notAfter: Date; reattestable: boolean }
  /** The clock is before the SVID's notBefore: it is behind. */
  | { kind: "not-yet-valid"; notBefore: Date; behindMs: number }
  /** Expired; `reattestable` says whether the agent can attest again on its own. */
  | { kind: "expired"; notAfter: Date; reattestable: boolean };

/**
 * The agent SVID judged at `now` against the re-attestation rules. `attestation` is the robot's
 * configured attestation, which wins over SPIRE's flag when the two disagree (an x509pop robot
 * whose data dir still holds an old join-token SVID re-attests with its certificate).
 */
export function judgeAgentSvid(
  state: AgentDataState | undefined,
  now: number,
  attestation?: "join_token" | "x509pop",
): AgentSvidVerdict {
  if (!state?.svid || !state.attested) return { kind: "none" };
  const reattestable = attestation ? attestation === "x509pop" : state.reattestable;
  if (now < state.svid.notBefore.getTime()) {
    return {
      kind: "not-yet-valid",
      notBefore: state.svid.notBefore,
      behindMs: state.svid.notBefore.getTime() - now,
    };
  }
  if (agentSvidExpired(state.svid, now)) {
    return { kind: "expired", notAfter: state.svid.notAfter, reattestable };
  }
  return { kind: "valid", notAfter: state.svid.notAfter, reattestable };
}
