/**
 * Robots and a broker reload (SIGHUP), against a REAL Mosquitto: what broker-identity does every
 * time the broker's SVID renews (tests/helpers/broker.ts `reloadCertificate`).
 *
 * The Mosquitto bug (read in 2.0.11's and 2.0.20's src/security_default.c, src/context.c,
 * src/session_expiry.c, lib/net_mosq.c; 2.0.21's changes do not touch them, and it reproduces on
 * 2.0.21): on SIGHUP, `mosquitto_security_apply_default` checks every client with a session again,
 * connected or not. An away client has no TLS connection any more, and since 2.0.12 no listener
 * either (`net__socket_close` clears it). In 2.0.11 it still has its listener, so an away client
 * of a `use_identity_as_username` listener fails "must have a valid certificate"; from 2.0.12 it
 * goes through the username/password check instead, which fails for every away client with
 * `per_listener_settings true` (no listener) and, with global settings, for every away client
 * without a valid password: every robot (its username is its certificate's CN). Such a client is
 * "disconnected" again: its state is set to `disconnecting` (so neither `do_disconnect` nor
 * `context__disconnect` sees it is already gone), the broker logs
 * "Client X disconnected." a second time, and `session_expiry__add` puts its session into the
 * session-expiry list a SECOND time (a new list item; the context remembers only the newest).
 * When the client comes back, the takeover removes that newest item and frees the old session;
 * the first item now points at freed memory. The next session that glibc places there (typically
 * the next client to connect) is "expired" at the next second: `Expiring client X due to
 * timeout`, its will is published, its session (subscriptions, queued QoS 1 messages) is gone:
 * `sessionPresent=false` on its next connect. Or Mosquitto crashes on the freed memory (2.0.21
 * does in the control below: SIGSEGV, or SIGABRT from glibc's `free()`).
 *
 * That is what tests/ca_upstream_rotation_test.ts saw: broker-identity's SIGHUP at 10:08:36.230
 * fell in robot-002's rotation gap (DISCONNECT at .247, reconnect at .268; the broker logged
 * "Client robot-002 disconnected." twice), and robot-001's next connection (10:08:39.6) was
 * expired at 10:08:40, then its next one at 10:08:42.
 *
 * So robots keep no session on the broker while they are away (`mqtt.sessionExpirySeconds` 0, the
 * default): a rotation gap or a pulled cable then leaves nothing for a reload to double-book.
 * What a persistent session kept is recovered by the protocol: the agent subscribes again on
 * every connect and the server sends tasks and cancels again on every register.
 *
 * Determinism: the harm needs the freed session's memory to be handed out again. glibc keeps the
 * first few frees of a size in a per-thread cache that `calloc` never uses, so the test first
 * rotates one robot a dozen times (each rotation frees a session) to fill that cache; from then
 * on the freed session is reused by the very next client. On 2.0.21 here the first round did
 * harm in 28 of 28 runs of the control: 14 expiries, 14 crashes (SIGSEGV or SIGABRT).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { AgentFleet, BrokerDied, type Robot } from "./helpers/agent_fleet.ts";
import { waitFor } from "../src/process/mod.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };
const AWAY = "robot-a";
const OTHER = "robot-b";

/**
 * The sequence of the incident: a robot is away while the broker reloads its certificate, comes
 * back (its old session is freed), then another robot makes a new connection (a rotation).
 */
async function reloadWhileAway(f: AgentFleet, other: Robot) {
  // The robot goes away (a clean stop here; a rotation gap or a pulled cable does the same).
  const lines = f.disconnectLines(AWAY);
  await f.robots.get(AWAY)!.agent.stop();
  await waitFor(() => f.disconnectLines(AWAY) > lines, { timeoutMs: 10_000, what: "away" });
  await f.broker.reloadCertificate();
  await f.start(AWAY); // back: the broker takes its session over (and frees the old one)
  const since = Date.now();
  await f.rotate(other); // the next new session on the broker
  return since;
}

/** Both robots connected, then a dozen rotations to fill glibc's cache (see the header). */
async function fleetOf(f: AgentFleet): Promise<Robot> {
  const other = await f.start(OTHER);
  await f.start(AWAY);
  for (let i = 0; i < 12; i++) await f.rotate(other);
  return other;
}

Deno.test(
  "broker reload while a robot is away: no other robot loses its connection or its session",
  opts,
  async () => {
    const f = await AgentFleet.create(); // the agent's defaults
    try {
      const other = await fleetOf(f);
      assert.ok(await f.brokerSecondsPassed(other, await reloadWhileAway(f, other)), "it died");
      // The reload found no session of the away robot to "disconnect" again.
      assert.equal(f.disconnectLines(AWAY), 1, f.brokerLog());
      assert.doesNotMatch(f.brokerLog(), /Expiring client/);
      assert.deepEqual(f.wills(OTHER), [], `${OTHER}'s will was published`);
      assert.deepEqual(f.unplannedDrops(f.robots.get(OTHER)!), []);
      assert.ok(other.agent.session.connected);
      assert.equal(other.agent.stats.sessionsLost, 0);
    } finally {
      await f.close();
    }
  },
);

Deno.test(
  "control: with persistent robot sessions the same reload double-books the away session, and " +
    "Mosquitto then expires another robot's live session or crashes",
  opts,
  async () => {
    const f = await AgentFleet.create({ sessionExpiry: 3600 });
    try {
      const other = await fleetOf(f);
      const expired = () => /Expiring client robot-b due to timeout/.test(f.brokerLog());
      let crashed = false;
      let rounds = 0;
      // The harm needs the stale entry's memory to become a session again, which another
      // allocation can prevent: the sequence is repeated (at most 6 times) until it hits.
      for (let i = 1; i <= 6 && !expired() && !crashed; i++) {
        rounds = i;
        try {
          crashed = !await f.brokerSecondsPassed(other, await reloadWhileAway(f, other));
        } catch (err) {
          if (!(err instanceof BrokerDied)) throw err;
          crashed = true; // at the away robot's return (the takeover) or at the next connect
        }
        // Each reload "disconnected" the away robot's session a second time: the trigger.
        assert.equal(f.disconnectLines(AWAY), 2 * i, f.brokerLog());
      }
      if (crashed) {
        await waitFor(() => f.broker.exitCode() !== undefined, { timeoutMs: 5000, what: "exit" });
        console.log(
          `  round ${rounds}: Mosquitto crashed: exit ${f.broker.exitCode()} (139 SIGSEGV, 134 SIGABRT)`,
        );
        assert.ok([134, 139].includes(f.broker.exitCode()!), `exit ${f.broker.exitCode()}`);
      } else {
        console.log(`  round ${rounds}: Mosquitto expired ${OTHER}'s live session`);
      }
      assert.ok(expired() || crashed, `no harm seen (broker log: ${f.brokerLog()})`);
      if (!crashed) {
        // Expired: its will was published while it was connected.
        await waitFor(() => f.wills(OTHER).length >= 1, { timeoutMs: 10_000, what: "the will" });
        assert.ok(f.unplannedDrops(other).length >= 1);
      }
    } finally {
      await f.close();
    }
  },
);

Deno.test(
  "a reconnect that finds its session gone is reported (mqtt.session_lost) and recovered",
  opts,
  async () => {
    const f = await AgentFleet.create({ sessionExpiry: 3600, reconnectMaxMs: 500 });
    try {
      const r = await f.start(OTHER);
      assert.equal(r.agent.stats.sessionsLost, 0);
      // The broker forgets every session: killed, its persistence file gone, started again.
      await f.broker.kill9();
      await Deno.remove(join(f.broker.files.persistenceDir, "mosquitto.db")).catch(() => {});
      await waitFor(() => !r.agent.session.connected, { timeoutMs: 10_000, what: "the drop" });
      await f.broker.start();
      await waitFor(() => r.agent.session.connected && r.agent.stats.sessionsLost === 1, {
        timeoutMs: 15_000,
        what: `the reconnect to report its lost session (logs: ${r.logs.slice(-6).join(" | ")})`,
      });
      assert.ok(r.logs.some((l) => l.includes("mqtt.session_lost")));
      // Recovered: registered on the new connection (the server sends tasks and cancels again
      // on it) and subscribed again: a message published to it now arrives (not a task: the
      // agent counts it as malformed and drops it, which proves the delivery).
      await waitFor(
        () =>
          f.got.some((m) =>
            m.type === "register" && m.robotId === OTHER &&
            m.connection === r.agent.session.connection
          ),
        { timeoutMs: 10_000, what: `${OTHER}'s register on its new connection` },
      );
      const malformed = r.agent.stats.malformed;
      await f.sub!.publishAsync(`k8s4r/robots/${OTHER}/down/task`, "not json", { qos: 1 });
      await waitFor(() => r.agent.stats.malformed > malformed, {
        timeoutMs: 10_000,
        what: `a message on ${OTHER}'s down/task to reach its agent`,
      });
      // Control: a broker that kept the session (a plain restart, persistence saved) is no loss.
      await f.broker.restart();
      const connects = r.agent.stats.connects;
      await waitFor(() => r.agent.session.connected && r.agent.stats.connects > connects, {
        timeoutMs: 15_000,
        what: "the reconnect after a restart",
      });
      assert.equal(r.agent.stats.sessionsLost, 1);
      assert.ok(r.logs.some((l) => l.includes('"sessionPresent":true')));
    } finally {
      await f.close();
    }
  },
);
