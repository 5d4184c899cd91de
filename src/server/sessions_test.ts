import assert from "node:assert/strict";
import { DashboardSessions, sessionCookie, setSessionCookie } from "./sessions.ts";

const admin = { spiffeId: "spiffe://k8s4r.test/operator/admin", operator: "admin" };
const vera = { spiffeId: "spiffe://k8s4r.test/operator/vera", operator: "vera" };

function login(s: DashboardSessions, who: typeof admin): string {
  const r = s.redeem(s.issueLogin(who).token);
  assert.ok(r.ok);
  return r.sessionId;
}

Deno.test("sessions: one operator's logins never push out another operator's sessions or logins", () => {
  const s = new DashboardSessions({
    maxSessions: 50,
    maxPendingLogins: 20,
    maxSessionsPerOperator: 4,
    maxPendingLoginsPerOperator: 3,
  });
  const adminSession = login(s, admin);
  const adminLogin = s.issueLogin(admin);
  // vera logs in 1000 times, and asks for 100 logins she never uses.
  const veras: string[] = [];
  for (let i = 0; i < 1000; i++) veras.push(login(s, vera));
  for (let i = 0; i < 100; i++) s.issueLogin(vera);
  assert.ok(s.lookup(adminSession), "admin's session survives");
  assert.ok(s.redeem(adminLogin.token).ok, "admin's unused login survives");
  // vera's own oldest went: she keeps her newest 4 sessions.
  assert.equal(veras.filter((v) => s.lookup(v)).length, 4);
  assert.ok(s.lookup(veras[999]));
  assert.equal(s.lookup(veras[0]), undefined);
  assert.ok(s.size.sessions <= 50 && s.size.pendingLogins <= 20, JSON.stringify(s.size));
});

Deno.test("sessions: ids are 256-bit random, only hashes are kept, a login's state is its issuer's", () => {
  const s = new DashboardSessions();
  const a = s.issueLogin(admin);
  const b = s.issueLogin(admin);
  assert.match(a.token, /^[A-Za-z0-9_-]{43}$/);
  assert.notEqual(a.token, b.token);
  assert.notEqual(a.id, a.token);
  assert.equal(s.loginState(a.id, admin.spiffeId), "pending");
  assert.equal(s.loginState(a.id, vera.spiffeId), "unknown");
  // A look does not use it; a redemption does, once.
  assert.deepEqual(s.peek(a.token), { ok: true, operator: "admin", spiffeId: admin.spiffeId });
  const r = s.redeem(a.token);
  assert.ok(r.ok);
  assert.deepEqual(s.redeem(a.token), { ok: false, reason: "used" });
  assert.deepEqual(s.peek(a.token), { ok: false, reason: "used" });
  assert.equal(s.loginState(a.id, admin.spiffeId), "used");
  assert.notEqual(r.sessionId, a.token);
  // The cookie round trip, and nothing else read as a session.
  const cookie = setSessionCookie(r.sessionId, 60).split(";")[0];
  const req = new Request("https://localhost/", {
    headers: { cookie: `other=1; ${cookie}; x=2` },
  });
  assert.equal(sessionCookie(req), r.sessionId);
  assert.ok(s.lookup(sessionCookie(req)));
  const shadow = new Request("https://localhost/", { headers: { cookie: "k8s4r_session=abc" } });
  assert.equal(sessionCookie(shadow), undefined, "the unprefixed name is not ours");
});

Deno.test("sessions: a session never outlives the certificate the login was asked with", () => {
  let now = 1_000_000;
  const s = new DashboardSessions({ now: () => now });
  const r = s.redeem(s.issueLogin(admin, now + 60_000).token);
  assert.ok(r.ok);
  assert.equal(r.session.expiresAt, now + 60_000);
  now += 59_000;
  assert.ok(s.lookup(r.sessionId), "the control: still inside the certificate's life");
  now += 2_000;
  assert.equal(s.lookup(r.sessionId), undefined);
});
