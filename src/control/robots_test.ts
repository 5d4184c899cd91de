import assert from "node:assert/strict";
import type { AgentRecord, Entry } from "../spire/server.ts";
import { renderRows } from "./command.ts";
import { checkRobotIdArg, robotRows, svidLifetimeMs, svidsValidUntil } from "./robots.ts";

const TD = "k8s4r.example.org";
const NOW = Date.parse("2026-12-01T10:00:00Z");
const TOKEN = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0";

function entry(spiffe: string, parent: string, selectors: string[], dns: string[] = []): Entry {
  return {
    id: crypto.randomUUID(),
    spiffeId: `spiffe://${TD}${spiffe}`,
    parentId: `spiffe://${TD}${parent}`,
    selectors,
    dnsNames: dns,
    x509SvidTtl: 0,
    hint: "",
  };
}

function agent(id: string, type: string, expiresIn: number, selectors: string[] = []) {
  return {
    id: `spiffe://${TD}/spire/agent/${id}`,
    attestationType: type,
    banned: false,
    canReattest: type === "x509pop",
    selectors,
    expiresAt: new Date(NOW + expiresIn),
  } satisfies AgentRecord;
}

const jtAlias = (robot: string, token = TOKEN) =>
  entry(`/k8s4r/node/${robot}`, `/spire/agent/join_token/${token}`, [
    `spiffe_id:spiffe://${TD}/spire/agent/join_token/${token}`,
  ]);
const x5Alias = (robot: string, serial: string) =>
  entry(`/k8s4r/node/${robot}`, "/spire/server", [
    `x509pop:subject:cn:${robot}`,
    `x509pop:serialnumber:${serial}`,
  ]);
const workload = (robot: string) =>
  entry(`/robot/${robot}`, `/k8s4r/node/${robot}`, ["unix:uid:0"], [robot]);

Deno.test("robot list: each state from SPIRE's entries and agents plus k8s4r's records", () => {
  const entries = [
    jtAlias("robot-001"),
    workload("robot-001"), // enrolled by token
    jtAlias("robot-002", "11111111-2222-3333-4444-555555555555"),
    workload("robot-002"), // token never used, still valid
    jtAlias("robot-003", "66666666-2222-3333-4444-555555555555"),
    workload("robot-003"), // token expired unused
    jtAlias("robot-004", "77777777-2222-3333-4444-555555555555"),
    workload("robot-004"), // token robot off past its agent SVID
    x5Alias("robot-005", "abc1"),
    workload("robot-005"), // x509pop, attested
    workload("robot-006"), // no alias
    entry("/mqtt-broker", "/k8s4r/node/broker", ["unix:uid:0"], ["localhost"]),
    entry("/k8s4r/node/broker", "/spire/agent/join_token/x", []),
  ];
  const agents = [
    agent(`join_token/${TOKEN}`, "join_token", 3_600_000),
    agent("join_token/77777777-2222-3333-4444-555555555555", "join_token", -60_000),
    agent("x509pop/ff", "x509pop", 1_800_000, [
      "x509pop:subject:cn:robot-005",
      "x509pop:serialnumber:abc1",
      "x509pop:ca:fingerprint:00",
    ]),
    // An older certificate of robot-005: not the alias's serial, not its agent.
    agent("x509pop/ee", "x509pop", 1_800_000, [
      "x509pop:subject:cn:robot-005",
      "x509pop:serialnumber:0ld",
    ]),
  ];
  const records = {
    "robot-002": {
      attestation: "join_token" as const,
      addedAt: "2026-12-01T09:55:00Z",
      expiresAt: "2026-12-01T10:05:00Z",
    },
    "robot-003": {
      attestation: "join_token" as const,
      addedAt: "2026-12-01T09:00:00Z",
      expiresAt: "2026-12-01T09:10:00Z",
    },
    "robot-005": {
      attestation: "x509pop" as const,
      addedAt: "2026-12-01T09:00:00Z",
      expiresAt: "2027-12-01T09:00:00Z",
      certSerial: "abc1",
    },
    "robot-009": { removedAt: "2026-12-01T09:30:00Z" },
    "robot-010": { removedAt: "2026-12-01T09:50:00Z", svidsValidUntil: "2026-12-01T10:51:00Z" },
  };
  const rows = robotRows(TD, entries, agents, records, ["robot-009", "robot-010"], NOW);
  const by = Object.fromEntries(rows.map((r) => [r.robotId, r]));
  assert.deepEqual(rows.map((r) => r.robotId), [
    "robot-001",
    "robot-002",
    "robot-003",
    "robot-004",
    "robot-005",
    "robot-006",
    "robot-009",
    "robot-010",
  ], "the broker's own node alias is not a robot");
  assert.equal(by["robot-001"].state, "enrolled");
  assert.equal(by["robot-001"].attestation, "join_token");
  assert.equal(by["robot-001"].agentId, `spiffe://${TD}/spire/agent/join_token/<redacted>`);
  assert.equal(by["robot-002"].state, "waiting");
  assert.equal(by["robot-002"].credentialExpires?.toISOString(), "2026-12-01T10:05:00.000Z");
  assert.equal(by["robot-003"].state, "expired");
  assert.match(by["robot-003"].detail, /join token expired unused .*k8s4r robot add robot-003/);
  assert.equal(by["robot-004"].state, "locked out");
  assert.match(by["robot-004"].detail, /used token cannot attest again; run: k8s4r robot add/);
  assert.equal(by["robot-005"].state, "enrolled");
  assert.equal(by["robot-005"].attestation, "x509pop");
  assert.equal(by["robot-005"].agentId, `spiffe://${TD}/spire/agent/x509pop/ff`);
  assert.equal(by["robot-005"].credentialExpires?.toISOString(), "2027-12-01T09:00:00.000Z");
  assert.equal(by["robot-006"].state, "incomplete");
  assert.equal(by["robot-009"].state, "removed");
  assert.equal(by["robot-009"].brokerCutOff, true);
  assert.equal(by["robot-009"].detail, "removed at 2026-12-01T09:30:00Z");
  assert.equal(
    by["robot-010"].detail,
    "removed at 2026-12-01T09:50:00Z; its old SVIDs may be valid until 2026-12-01T10:51:00Z: robot add waits until then (or --force)",
  );
  assert.equal(by["robot-001"].brokerCutOff, false);

  const text = renderRows(rows, NOW);
  assert.doesNotMatch(text, new RegExp(TOKEN), "a join token in robot list's output");
  assert.match(
    text,
    /^robot-001\s+join-token\s+enrolled\s+used\s+2026-12-01T11:00:00Z \(in 1h\)\s+allowed$/m,
  );
  assert.match(text, /^robot-009\s+unknown\s+removed\s+-\s+-\s+cut off$/m);
  // Without the broker's answer the column says so instead of guessing.
  assert.match(renderRows(robotRows(TD, entries, agents, records, undefined, NOW), NOW), /\s\?$/m);
});

Deno.test("robot add/remove: reserved and malformed ids are usage errors", () => {
  // localhost: the CN of the fleet server's and the broker's own SVIDs (their -dns localhost).
  for (const id of ["k8s4r-server", "k8s4r-admin", "k8s4r-anything", "broker", "localhost"]) {
    assert.throws(() => checkRobotIdArg(id, "add"), (e: Error & { exitCode?: number }) => {
      assert.equal(e.exitCode, 2);
      assert.match(e.message, /is reserved/);
      return true;
    });
  }
  assert.throws(() => checkRobotIdArg("Robot 7", "add"), /expected a robot id/);
  assert.throws(() => checkRobotIdArg(undefined, "remove"), /robot remove ID/);
  assert.equal(checkRobotIdArg("robot-007", "add"), "robot-007");
});

Deno.test("robot remove records how long the old SVIDs live: the default, or a longer entry TTL", () => {
  const cfg = (ttl?: string) => ({
    file: "/x.json",
    trustDomain: TD,
    spireServer: { adminSocket: "/s", address: "h:1", ...(ttl ? { defaultX509SvidTtl: ttl } : {}) },
    broker: { url: "ssl://h:2", adminAddress: "127.0.0.1:1", adminCredentials: "/a" },
    robotSelectors: ["unix:uid:0"],
    records: "/r.json",
  });
  assert.equal(svidLifetimeMs(cfg(), []), 3_600_000, "SPIRE's own default");
  assert.equal(svidLifetimeMs(cfg("20m"), []), 1_200_000);
  const long = { ...workload("robot-001"), x509SvidTtl: 7200 };
  assert.equal(svidLifetimeMs(cfg("20m"), [long]), 7_200_000, "an entry's longer TTL wins");
  // A removal recorded by an older k8s4r (no svidsValidUntil): removedAt + default + margin.
  assert.equal(
    svidsValidUntil({ removedAt: "2026-12-01T09:00:00Z" }, cfg()),
    Date.parse("2026-12-01T10:01:00Z"),
  );
  assert.equal(
    svidsValidUntil({ svidsValidUntil: "2026-12-01T09:30:00Z" }, cfg()),
    Date.parse("2026-12-01T09:30:00Z"),
  );
  assert.equal(svidsValidUntil({ addedAt: "2026-12-01T09:00:00Z" }, cfg()), undefined);
});
