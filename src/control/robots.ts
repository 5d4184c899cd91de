/**
 * Enrollment on the control host: `k8s4r robot add`, `robot list`, `robot remove`.
 *
 * What a robot is made of in SPIRE (src/fleet/ids.ts):
 *   - its node alias `spiffe://<td>/k8s4r/node/<id>`: for a join token, the entry SPIRE creates
 *     with the token (parent = the join-token agent, `.../spire/agent/join_token/<token>`); for
 *     x509pop, a node entry whose selectors are the certificate's CN, its factory CA and its
 *     serial (`x509pop:subject:cn:<id>`, `x509pop:ca:fingerprint:<sha1>`,
 *     `x509pop:serialnumber:<hex>`: `x509popAliasSelectors`), so an older certificate of the
 *     same robot no longer gets the alias once a new one is issued, nor does a certificate with
 *     the same CN and serial from another CA of the x509pop bundle;
 *   - its workload entry `spiffe://<td>/robot/<id>` under that alias, with `-dns <id>`: the CN
 *     rule that makes the robot id its MQTT username;
 *   - its attested agent (`spire-server agent list`).
 * The broker knows a robot only when it was removed: the dynamic-security plugin's deny list
 * (src/mqtt/dynsec.ts).
 */
import { CliError, errorMessage, UsageError } from "../cli/errors.ts";
import { parseDuration } from "../fleet/duration.ts";
import {
  type AttestationType,
  enrollCommand,
  type Enrollment,
  writeEnrollmentFile,
} from "../fleet/enrollment.ts";
import {
  brokerSpiffeId,
  fleetServerSpiffeId,
  isReservedRobotId,
  nodeSpiffeId,
  robotDnsNames,
  robotSpiffeId,
} from "../fleet/ids.ts";
import { isRobotId } from "../fleet/topics.ts";
import { redactJoinTokens } from "../spire/redact.ts";
import type { AgentRecord, Entry, SpireServerCli } from "../spire/server.ts";
import {
  cutOffUsername,
  type DynsecAdmin,
  removedUsernames,
  restoreUsername,
} from "../mqtt/dynsec.ts";
import type { ControlHostConfig } from "./config.ts";
import { FactoryCa } from "./factory_ca.ts";
import { x509popAliasSelectors } from "../spire/node_attestor.ts";
import { readRecords, type Records, type RobotRecord, updateRecords } from "./records.ts";

export const DEFAULT_TOKEN_TTL_MS = 600_000;
export const DEFAULT_CERT_TTL_MS = 365 * 86_400_000;
/** SPIRE's own `default_x509_svid_ttl`, when the control-host config does not say. */
export const DEFAULT_X509_SVID_TTL_MS = 3_600_000;
/**
 * Added to a removed robot's SVID lifetime: SPIRE's entry cache may still serve the deleted
 * entry for a few seconds (5 s by default), and the robot's clock may be ahead of ours.
 */
export const REMOVAL_MARGIN_MS = 60_000;

/** The longest lifetime of an X.509 SVID issued under `entry` (its own TTL, or the default). */
export function svidLifetimeMs(cfg: ControlHostConfig, entries: Entry[]): number {
  const dflt = cfg.spireServer.defaultX509SvidTtl
    ? parseDuration(cfg.spireServer.defaultX509SvidTtl)
    : DEFAULT_X509_SVID_TTL_MS;
  return Math.max(dflt, ...entries.map((e) => e.x509SvidTtl * 1000));
}

/**
 * Until when a removed robot's old SVIDs can be valid: the record's `svidsValidUntil`, or (a
 * removal recorded by an older k8s4r) its `removedAt` plus the default lifetime and margin.
 */
export function svidsValidUntil(rec: RobotRecord, cfg: ControlHostConfig): number | undefined {
  if (rec.svidsValidUntil) return Date.parse(rec.svidsValidUntil);
  if (!rec.removedAt) return undefined;
  return Date.parse(rec.removedAt) + svidLifetimeMs(cfg, []) + REMOVAL_MARGIN_MS;
}

export interface ControlDeps {
  config: ControlHostConfig;
  spire: SpireServerCli;
  /** Connects to the broker's dynamic-security plugin as the admin. */
  broker: () => Promise<DynsecAdmin>;
  now?: () => number;
}

/** A usage error for a robot id `robot add`/`remove` may not touch. */
export function checkRobotIdArg(id: string | undefined, cmd: string): string {
  if (!id) throw new UsageError(`robot ${cmd}: the robot id is required (robot ${cmd} ID)`);
  if (!isRobotId(id)) {
    throw new UsageError(`robot ${cmd}: expected a robot id [a-z0-9][a-z0-9-]{0,62}, got '${id}'`);
  }
  if (isReservedRobotId(id)) {
    throw new UsageError(
      `robot ${cmd}: '${id}' is reserved (k8s4r-*, broker and localhost are the fleet's own names; a robot's id is its MQTT username and client id)`,
    );
  }
  return id;
}

function joinTokenAgentPrefix(td: string): string {
  return `spiffe://${td}/spire/agent/join_token/`;
}

function serverId(td: string): string {
  return `spiffe://${td}/spire/server`;
}

/** The agents that attest as this alias entry: a join token's own agent, or x509pop matches. */
export function agentsOfAlias(alias: Entry, agents: AgentRecord[], td: string): AgentRecord[] {
  if (alias.parentId.startsWith(joinTokenAgentPrefix(td))) {
    return agents.filter((a) => a.id === alias.parentId);
  }
  if (alias.parentId === serverId(td) && alias.selectors.length > 0) {
    return agents.filter((a) => alias.selectors.every((s) => a.selectors.includes(s)));
  }
  return [];
}

/** Every agent that ever attested for robot `id` by x509pop (any certificate with its CN). */
function x509popAgentsOf(id: string, agents: AgentRecord[]): AgentRecord[] {
  return agents.filter((a) => a.selectors.includes(`x509pop:subject:cn:${id}`));
}

export interface AddOptions {
  robotId: string;
  attestation: AttestationType;
  /** x509pop: the robot's CSR (PEM). */
  csrPem?: string;
  /** Token lifetime (join token) or certificate validity (x509pop). */
  ttlMs?: number;
  /** Where the enrollment file goes. */
  out: string;
  /**
   * Lift the cut-off of a removed robot although SVIDs it got before its removal may still be
   * valid (they can then reach the broker again until they expire).
   */
  force?: boolean;
}

export interface AddResult {
  enrollment: Enrollment;
  out: string;
  /** What to run on the robot. */
  command: string;
  /** What was done, one line each. */
  steps: string[];
  /** What `force` let through, one line each. */
  warnings: string[];
}

/**
 * Enrolls a robot. Everything is checked before anything changes (the CSR, the factory CA, the
 * broker's answer, a removed robot's old SVIDs); then SPIRE, the enrollment file, and last the
 * broker: a removed robot's cut-off is lifted only once all else succeeded, and only after every
 * SVID it got before its removal has expired (the broker tells them from new ones by nothing but
 * the CN), unless `force`.
 */
export async function addRobot(deps: ControlDeps, o: AddOptions): Promise<AddResult> {
  const { config: cfg, spire } = deps;
  const now = deps.now?.() ?? Date.now();
  const td = cfg.trustDomain;
  const id = o.robotId;
  const nodeId = nodeSpiffeId(td, id);
  const steps: string[] = [];
  const warnings: string[] = [];
  if (o.attestation === "x509pop" && !o.csrPem) {
    throw new UsageError(
      `robot add: --attestation x509pop needs --csr FILE (on the robot: k8s4r agent csr --robot-id ${id} > ${id}.csr)`,
    );
  }
  if (o.attestation === "join_token" && o.csrPem) {
    throw new UsageError("robot add: --csr is for --attestation x509pop");
  }
  // Signing is local and changes nothing: a CSR for another CN is refused here.
  const cert = o.attestation === "x509pop"
    ? (await loadFactory(cfg)).signCsr(o.csrPem!, id, o.ttlMs ?? DEFAULT_CERT_TTL_MS, now)
    : undefined;

  const records = await readRecords(cfg.records);
  const admin = await deps.broker();
  try {
    const cutOff = (await removedUsernames(admin)).includes(id);
    const rec = records[id];
    const until = rec ? svidsValidUntil(rec, cfg) : undefined;
    if (cutOff) {
      const why = until === undefined
        ? `${id} is cut off on the broker, and k8s4r's records (${cfg.records}) do not say when it was removed: SVIDs it got before may still be valid`
        : until > now
        ? `${id} was removed at ${rec!.removedAt}; SVIDs it got before that stay valid until ${
          new Date(until).toISOString()
        } (${Math.ceil((until - now) / 60_000)} min from now)`
        : undefined;
      if (why && !o.force) {
        throw new CliError(
          `robot add: ${why}, and the broker cannot tell them from a new one (same CN): it stays cut off until then`,
          1,
          `add it again after that time, or pass --force to lift the cut-off now (anyone holding an old SVID of ${id} can then use the broker as ${id} until it expires)`,
        );
      }
      if (why) {
        warnings.push(
          `--force: ${why}; whoever holds one can publish and subscribe as ${id}${
            until !== undefined ? ` until ${new Date(until).toISOString()}` : ""
          }`,
        );
      }
    }

    const [entries, agents] = await Promise.all([spire.listEntries(), spire.listAgents()]);
    const aliases = entries.filter((e) => e.spiffeId === nodeId);
    let attestation: Enrollment["attestation"];
    let keep: Entry | undefined;
    let record: RobotRecord;
    if (!cert) {
      const ttlS = Math.max(1, Math.round((o.ttlMs ?? DEFAULT_TOKEN_TTL_MS) / 1000));
      // SPIRE makes the node alias entry for the token (parent = the token's agent).
      const token = await spire.generateJoinToken(nodeId, ttlS);
      attestation = { type: "join_token", token: token.value, expiresAt: token.expiresAt };
      steps.push(
        `SPIRE: join token for ${nodeId}, single use, expires ${token.expiresAt.toISOString()}`,
      );
      record = {
        attestation: "join_token",
        addedAt: new Date(now).toISOString(),
        expiresAt: token.expiresAt.toISOString(),
      };
    } else {
      attestation = { type: "x509pop", certificate: cert.chainPem, expiresAt: cert.notAfter };
      const desired = {
        node: true,
        spiffeId: nodeId,
        parentId: serverId(td),
        selectors: x509popAliasSelectors({
          commonName: id,
          serialHex: cert.serialHex,
          caFingerprint: cert.caFingerprint,
        }),
        dnsNames: [],
      };
      keep = aliases.find((e) => e.parentId === serverId(td));
      if (keep) {
        await spire.updateEntry(keep.id, desired);
        steps.push(
          `SPIRE: node alias ${nodeId} now matches the new certificate (serial ${cert.serialHex})`,
        );
      } else {
        keep = await spire.createEntry(desired);
        steps.push(`SPIRE: node alias ${nodeId} for x509pop CN=${id}, serial ${cert.serialHex}`);
      }
      steps.push(`factory CA: signed CN=${id}, valid until ${cert.notAfter.toISOString()}`);
      record = {
        attestation: "x509pop",
        addedAt: new Date(now).toISOString(),
        expiresAt: cert.notAfter.toISOString(),
        certSerial: cert.serialHex,
      };
    }

    // Older credentials of this robot stop counting: their alias entries go, their agents are
    // evicted (a re-enrolled robot attests anew with the file written below).
    const stale = aliases.filter((e) => e.id !== keep?.id);
    const staleAgents = new Map<string, AgentRecord>();
    for (const e of stale) for (const a of agentsOfAlias(e, agents, td)) staleAgents.set(a.id, a);
    if (cert) {
      for (const a of x509popAgentsOf(id, agents)) {
        if (!a.selectors.includes(`x509pop:serialnumber:${record.certSerial}`)) {
          staleAgents.set(a.id, a);
        }
      }
    }
    await Promise.all(stale.map((e) => spire.deleteEntry(e.id)));
    if (stale.length) steps.push(`SPIRE: deleted ${stale.length} older node alias entr(ies)`);
    for (const a of staleAgents.values()) {
      if (!a.banned && (await spire.evictAgent(a.id)) === "done") {
        steps.push(`SPIRE: evicted the older agent ${redactJoinTokens(a.id)}`);
      }
    }

    // The workload entry, with the CN rule.
    const r = await spire.reconcileEntry({
      spiffeId: robotSpiffeId(td, id),
      parentId: nodeId,
      selectors: cfg.robotSelectors,
      dnsNames: robotDnsNames(id),
    });
    steps.push(`SPIRE: workload entry ${robotSpiffeId(td, id)} -dns ${id} (${r})`);

    const enrollment: Enrollment = {
      version: 1,
      robotId: id,
      trustDomain: td,
      spireServerAddress: cfg.spireServer.address,
      brokerUrl: cfg.broker.url,
      brokerSpiffeId: brokerSpiffeId(td),
      fleetServerSpiffeId: fleetServerSpiffeId(td),
      trustBundle: await spire.bundlePem(),
      createdAt: new Date(now),
      attestation,
    };
    await writeEnrollmentFile(o.out, enrollment);

    // The broker last: everything else is in place.
    if (cutOff) {
      try {
        if (await restoreUsername(admin, id)) steps.push(`broker: lifted the cut-off of ${id}`);
      } catch (err) {
        throw new CliError(
          `robot add: ${id} is enrolled in SPIRE (${o.out} written), but the broker still cuts it off: ${
            errorMessage(err)
          }`,
          1,
          `run the same robot add again once the broker answers (it writes a new ${o.out})`,
        );
      }
    }
    await updateRecords(cfg.records, (rs) => void (rs[id] = record));
    return { enrollment, out: o.out, command: enrollCommand(id), steps, warnings };
  } finally {
    await admin.close();
  }
}

async function loadFactory(cfg: ControlHostConfig): Promise<FactoryCa> {
  if (!cfg.factoryCa) {
    throw new CliError(
      `${cfg.file}: factoryCa: not set, so robot add cannot sign an x509pop certificate`,
      1,
      "on a dev stack: k8s4r devenv start --attestation x509pop; otherwise add factoryCa {cert, key} to the control-host config",
    );
  }
  return await FactoryCa.load(cfg.factoryCa);
}

// ---------------------------------------------------------------------------------------------
// robot list

export type RobotState =
  | "waiting"
  | "enrolled"
  | "expired"
  | "locked out"
  | "banned"
  | "removed"
  | "incomplete";

export interface RobotRow {
  robotId: string;
  attestation: AttestationType | "unknown";
  state: RobotState;
  /** One line: what the state means and what to do. */
  detail: string;
  /** The credential's expiry: the join token's (until used), or the x509pop certificate's. */
  credentialExpires?: Date;
  /** The agent SVID's notAfter, while attested. */
  agentSvidExpires?: Date;
  /** The agent's SPIFFE ID, join tokens redacted. */
  agentId?: string;
  /** Cut off the broker (the dynamic-security deny list); undefined = the broker was not asked. */
  brokerCutOff?: boolean;
}

/**
 * Each robot's enrollment state, from SPIRE's entries and agents, k8s4r's records (token and
 * certificate expiry: SPIRE cannot list tokens) and the broker's deny list. Pure.
 */
export function robotRows(
  td: string,
  entries: Entry[],
  agents: AgentRecord[],
  records: Records,
  cutOff: string[] | undefined,
  now: number,
): RobotRow[] {
  const nodePrefix = nodeSpiffeId(td, "");
  const ids = new Set<string>(Object.keys(records));
  for (const e of entries) {
    if (e.spiffeId.startsWith(nodePrefix)) ids.add(e.spiffeId.slice(nodePrefix.length));
    const m = e.spiffeId.startsWith(robotSpiffeId(td, ""))
      ? e.spiffeId.slice(robotSpiffeId(td, "").length)
      : undefined;
    if (m && e.parentId === nodeSpiffeId(td, m)) ids.add(m);
  }
  for (const x of cutOff ?? []) if (isRobotId(x)) ids.add(x);
  const rows: RobotRow[] = [];
  for (const id of [...ids].sort()) {
    if (isReservedRobotId(id)) continue; // the broker's own node alias
    const rec = records[id];
    const aliases = entries.filter((e) => e.spiffeId === nodeSpiffeId(td, id));
    const workload = entries.find((e) =>
      e.spiffeId === robotSpiffeId(td, id) && e.parentId === nodeSpiffeId(td, id)
    );
    const alias = aliases[aliases.length - 1];
    const attestation: RobotRow["attestation"] = alias
      ? alias.parentId.startsWith(joinTokenAgentPrefix(td)) ? "join_token" : "x509pop"
      : rec?.attestation ?? "unknown";
    const agentList = alias ? agentsOfAlias(alias, agents, td) : [];
    const agent = agentList.find((a) => !a.banned) ?? agentList[0];
    const recCurrent = rec && rec.attestation === attestation && !rec.removedAt ? rec : undefined;
    const credentialExpires = recCurrent?.expiresAt ? new Date(recCurrent.expiresAt) : undefined;
    const row: RobotRow = {
      robotId: id,
      attestation,
      state: "incomplete",
      detail: "",
      credentialExpires,
      agentSvidExpires: agent?.expiresAt,
      agentId: agent ? redactJoinTokens(agent.id) : undefined,
      brokerCutOff: cutOff ? cutOff.includes(id) : undefined,
    };
    const readd = `k8s4r robot add ${id}${
      attestation === "x509pop" ? " --attestation x509pop --csr FILE" : ""
    }`;
    if (!alias && !workload) {
      row.state = "removed";
      row.detail = rec?.removedAt
        ? `removed at ${rec.removedAt}${
          rec.svidsValidUntil && Date.parse(rec.svidsValidUntil) > now
            ? `; its old SVIDs may be valid until ${rec.svidsValidUntil}: robot add waits until then (or --force)`
            : ""
        }`
        : "no SPIRE entries (only on the broker's deny list)";
    } else if (!alias || !workload) {
      row.detail = !alias
        ? "workload entry without a node alias: the robot cannot get its SVID"
        : "node alias without the workload entry (-dns id)";
      row.detail += `; run: ${readd}`;
    } else if (agent?.banned) {
      row.state = "banned";
      row.detail = `its agent is banned; run: ${readd}`;
    } else if (agent && agent.expiresAt.getTime() > now) {
      row.state = "enrolled";
      row.detail = attestation === "join_token"
        ? "attested (its token is used up); it must renew before its agent SVID expires"
        : "attested; it re-attests with its certificate whenever needed";
    } else if (agent) {
      if (attestation === "join_token") {
        row.state = "locked out";
        row.detail =
          `its agent SVID expired at ${agent.expiresAt.toISOString()} and a used token cannot attest again; run: ${readd}`;
      } else {
        row.state = "enrolled";
        row.detail = "its agent SVID expired; it re-attests with its certificate when it starts";
      }
    } else if (credentialExpires && credentialExpires.getTime() <= now) {
      row.state = "expired";
      row.detail = attestation === "join_token"
        ? `the join token expired unused at ${credentialExpires.toISOString()}; run: ${readd}`
        : `the certificate expired at ${credentialExpires.toISOString()}; run: ${readd}`;
    } else {
      row.state = "waiting";
      row.detail = "not attested yet: run the enrollment on the robot";
    }
    rows.push(row);
  }
  return rows;
}

export async function listRobots(
  deps: ControlDeps,
  opts: { broker?: boolean } = {},
): Promise<{ rows: RobotRow[]; brokerError?: string }> {
  const { config: cfg, spire } = deps;
  const [entries, agents, records] = await Promise.all([
    spire.listEntries(),
    spire.listAgents(),
    readRecords(cfg.records),
  ]);
  let cutOff: string[] | undefined;
  let brokerError: string | undefined;
  if (opts.broker !== false) {
    try {
      const admin = await deps.broker();
      try {
        cutOff = await removedUsernames(admin);
      } finally {
        await admin.close();
      }
    } catch (err) {
      brokerError = (err as Error).message;
    }
  }
  return {
    rows: robotRows(cfg.trustDomain, entries, agents, records, cutOff, deps.now?.() ?? Date.now()),
    brokerError,
  };
}

// ---------------------------------------------------------------------------------------------
// robot remove

export interface RemoveResult {
  steps: string[];
  /** When the broker confirmed the cut-off, in ms since the command started. */
  brokerCutOffMs: number;
}

/**
 * Cuts the robot off the broker at once (every session disconnected, every later publish,
 * subscribe and delivery refused), then deletes its SPIRE entries and evicts its agent (a
 * join-token agent) or bans it (an x509pop agent, which could otherwise attest again with its
 * certificate). Idempotent.
 */
export async function removeRobot(deps: ControlDeps, id: string): Promise<RemoveResult> {
  const { config: cfg, spire } = deps;
  const t0 = performance.now();
  const td = cfg.trustDomain;
  const [entries, agents, records] = await Promise.all([
    spire.listEntries(),
    spire.listAgents(),
    readRecords(cfg.records),
  ]);
  const mine = entries.filter((e) =>
    e.spiffeId === nodeSpiffeId(td, id) ||
    (e.spiffeId === robotSpiffeId(td, id) && e.parentId === nodeSpiffeId(td, id))
  );
  if (mine.length === 0 && !records[id]) {
    throw new CliError(
      `no robot ${id}: SPIRE has no entry for it and robot add never added it`,
      1,
      "k8s4r robot list",
    );
  }
  const steps: string[] = [];
  const admin = await deps.broker();
  let brokerCutOffMs: number;
  try {
    await cutOffUsername(admin, id);
    brokerCutOffMs = performance.now() - t0;
    steps.push(
      `broker: ${id} disconnected and denied every topic (${Math.round(brokerCutOffMs)} ms)`,
    );
  } finally {
    await admin.close();
  }
  const targets = new Map<string, { agent: AgentRecord; ban: boolean }>();
  for (const e of mine) {
    for (const a of agentsOfAlias(e, agents, td)) {
      targets.set(a.id, { agent: a, ban: a.attestationType === "x509pop" });
    }
  }
  for (const a of x509popAgentsOf(id, agents)) targets.set(a.id, { agent: a, ban: true });
  await Promise.all(mine.map((e) => spire.deleteEntry(e.id)));
  steps.push(`SPIRE: deleted ${mine.length} entr(ies) (node alias and workload)`);
  for (const { agent, ban } of targets.values()) {
    if (ban && agent.banned) continue;
    const r = await spire.evictAgent(agent.id, ban);
    if (r === "done") {
      steps.push(`SPIRE: ${ban ? "banned" : "evicted"} its agent ${redactJoinTokens(agent.id)}`);
    }
  }
  // Until when an SVID it got before now can be valid: robot add keeps it cut off until then.
  const removedAt = deps.now?.() ?? Date.now();
  const validUntil = new Date(
    removedAt + svidLifetimeMs(cfg, mine.filter((e) => e.spiffeId === robotSpiffeId(td, id))) +
      REMOVAL_MARGIN_MS,
  ).toISOString();
  await updateRecords(cfg.records, (rs) => {
    rs[id] = {
      ...rs[id],
      removedAt: new Date(removedAt).toISOString(),
      svidsValidUntil: validUntil,
    };
  });
  steps.push(`records: SVIDs it got before stay valid until ${validUntil} at most`);
  return { steps, brokerCutOffMs };
}
