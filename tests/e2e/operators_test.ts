/**
 * End to end, operators (issue 11): the fleet server's HTTPS API against a real stack
 * (`devenv start --robots 1 --broker native`, real SPIRE, real Mosquitto, the real CLI and
 * curl). The security matrix of the API, each case with its positive control:
 *
 * - no client certificate: 401; a certificate of a foreign CA: 401; a robot's SVID: 403;
 * - a viewer creating a task: 403 (it reads: 200);
 * - a CSRF-shaped request (text/plain POST, foreign Origin and Host, even with the operator's
 *   certificate, as a browser that holds it would send): refused, nothing created;
 * - curl with `k8s4r operator creds` works; `operator remove` makes a kept copy useless.
 *
 * The README's commands (`k8s4r robots`, `k8s4r task run robot-001 -- echo hi`) work as written
 * because `devenv start` created the admin operator.
 */
import assert from "node:assert/strict";
import tls from "node:tls";
import { TestCa } from "../../src/spiffe/testing/test_ca.ts";
import { stopPidFile, waitFor } from "../../src/process/mod.ts";
import { E2eStack, metric, type Svid, TRUST_DOMAIN } from "./stack.ts";

const stack = await E2eStack.create({ heartbeatSeconds: 1, robots: 1 });
const e2e = stack.caseRegistrar("e2e operators: ");

/** The CLI on the control host: devenv's roles file and SPIRE admin socket. */
const control = stack.controlEnv();

/** The CLI with `extra` in its env for this call. */
const cli = (args: string[], extra: Record<string, string> = {}) =>
  stack.k8s4r(args, { env: extra });

/** A fetch client with this certificate (or none), trusting SPIRE's bundle. */
function clientWith(cert: Svid | null, ca: string): Deno.HttpClient {
  return Deno.createHttpClient({
    caCerts: [ca],
    ...(cert ? { cert: cert.cert, key: cert.key } : {}),
  });
}

async function asJson(url: string, client: Deno.HttpClient, init: RequestInit = {}) {
  try {
    const r = await fetch(url, { ...init, client, signal: AbortSignal.timeout(5000) });
    return { status: r.status, body: await r.json() };
  } finally {
    client.close();
  }
}

/** One HTTP/1.1 request over TLS with exactly these headers (fetch would set Host itself). */
function rawRequest(
  lines: string[],
  body: string,
  cert: { cert: string; key: string },
  ca: string,
): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const c = tls.connect({
      host: "127.0.0.1",
      port: stack.ports.http,
      servername: "localhost",
      ca,
      cert: cert.cert,
      key: cert.key,
    }, () => {
      c.write(
        [
          ...lines,
          `Content-Length: ${new TextEncoder().encode(body).byteLength}`,
          "Connection: close",
          "",
          body,
        ].join("\r\n"),
      );
    });
    let out = "";
    c.on("data", (d) => (out += d));
    c.on(
      "end",
      () => resolve({ status: Number(/^HTTP\/1\.1 (\d{3})/.exec(out)?.[1] ?? 0), text: out }),
    );
    c.on("error", reject);
  });
}

let bundle = "";
let admin: { cert: string; key: string; bundle: string; serverUrl: string };

e2e("devenv start brings the stack up and creates the admin operator", async () => {
  const r = await stack.start();
  assert.match(r.stdout, /operators: operator admin \(operator\): credentials written/);
  assert.match(r.stdout, /server: started .*https:\/\/localhost:\d+/);
  stack.started = true;
  bundle = await Deno.readTextFile(stack.layout.caBundleFile);
  const c = await stack.k8s4r(["operator", "creds", "--json"]);
  assert.equal(c.code, 0, c.stderr);
  admin = JSON.parse(c.stdout);
  assert.equal(admin.serverUrl, stack.api);
});

e2e("README's commands work as written: robots, task run (admin found by itself)", async () => {
  await stack.waitOnline(stack.robotIds);
  const robots = await stack.k8s4r(["robots"]);
  assert.equal(robots.code, 0, robots.stderr);
  assert.match(robots.stdout, /^robot-001\s+online/m);
  const t0 = Date.now();
  const run = await stack.k8s4r(["task", "run", "robot-001", "--", "echo", "hi"]);
  metric("operators.task_run_cli_ms", Date.now() - t0);
  assert.equal(run.code, 0, run.stderr);
  assert.equal(run.stdout, "hi\n");
  const tasks = await stack.k8s4r(["tasks", "--robot", "robot-001"]);
  assert.equal(tasks.code, 0, tasks.stderr);
  assert.match(tasks.stdout, /^\S+\s+robot-001\s+done\s+\S+\s+admin\s+echo hi$/m, tasks.stdout);
  const view = await stack.http<{ tasks: { createdBy: string }[] }>("/api/tasks?limit=1");
  assert.equal(view.body.tasks[0].createdBy, `spiffe://${TRUST_DOMAIN}/operator/admin`);
});

e2e(
  "security: the API without a client certificate is refused (401); with admin's: 200",
  async () => {
    const none = await asJson(`${stack.api}/api/robots`, clientWith(null, bundle));
    assert.equal(none.status, 401);
    assert.equal(none.body.code, "no-certificate");
    // /healthz is the one endpoint without a certificate.
    assert.equal((await asJson(`${stack.api}/healthz`, clientWith(null, bundle))).status, 200);
    // Positive control: the same request as admin.
    assert.equal((await stack.http("/api/robots")).status, 200);
  },
);

e2e("security: an operator certificate of a foreign CA is refused (401)", async () => {
  const foreign = TestCa.create({ trustDomain: TRUST_DOMAIN }).issue({
    spiffeId: `spiffe://${TRUST_DOMAIN}/operator/admin`,
  });
  const r = await asJson(
    `${stack.api}/api/robots`,
    clientWith({ cert: foreign.chainPem, key: foreign.keyPem, ca: "" }, bundle),
  );
  assert.equal(r.status, 401);
  assert.equal(r.body.code, "untrusted-certificate");
  assert.match(r.body.error, /not issued under the X\.509 bundle/);
  assert.equal((await stack.http("/api/robots")).status, 200, "positive control");
});

e2e("security: a robot's real SVID is not an operator (403)", async () => {
  const robot = await stack.fetchSvid("robot-001");
  const r = await asJson(`${stack.api}/api/robots`, clientWith(robot, bundle));
  assert.equal(r.status, 403);
  assert.equal(r.body.code, "not-an-operator");
  assert.match(r.body.error, /spiffe:\/\/k8s4r\.example\.org\/robot\/robot-001 is not an operator/);
  const create = await asJson(
    `${stack.api}/api/robots/robot-001/tasks`,
    clientWith(robot, bundle),
    {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ command: ["id"] }),
    },
  );
  assert.equal(create.status, 403);
  assert.equal((await stack.http("/api/robots")).status, 200, "positive control");
});

e2e("security: a viewer reads (200) but cannot create a task (403)", async () => {
  const add = await cli(["operator", "add", "vera", "--role", "viewer"], control);
  assert.equal(add.code, 0, add.stderr);
  const asVera = { ...control, K8S4R_OPERATOR: "vera" };
  const robots = await cli(["robots"], asVera);
  assert.equal(robots.code, 0, robots.stderr);
  const run = await cli(["task", "run", "robot-001", "--", "echo", "from-vera"], asVera);
  assert.equal(run.code, 1);
  assert.match(
    run.stderr,
    /vera is a viewer: creating and cancelling tasks needs the operator role/,
  );
  const byApi = await stack.http<{ code: string }>("/api/robots/robot-001/tasks", {
    method: "POST",
    body: JSON.stringify({ command: ["echo", "from-vera"] }),
    operator: "vera",
  });
  assert.equal(byApi.status, 403);
  assert.equal(byApi.body.code, "forbidden");
  const tasks = await stack.http<{ tasks: { command: string[] }[] }>("/api/tasks?limit=1000");
  assert.ok(
    !tasks.body.tasks.some((t) => t.command.includes("from-vera")),
    "a viewer's task exists",
  );
  // Positive control: the operator role creates it.
  const ok = await stack.createTask("robot-001", ["echo", "from-admin"]);
  assert.equal((await stack.waitTask(ok)).state, "done");
});

e2e(
  "security: a CSRF-shaped request (text/plain, foreign Origin and Host) is refused",
  async () => {
    const before =
      (await stack.http<{ tasks: unknown[] }>("/api/tasks?limit=1000")).body.tasks.length;
    const body = JSON.stringify({ command: ["echo", "csrf"] });
    // A browser holding the operator's certificate, on a page of evil.example whose name now
    // points at 127.0.0.1 (DNS rebinding): it sends its own Host and Origin, and text/plain (a
    // "simple" request, no CORS preflight).
    const creds = {
      cert: await Deno.readTextFile(admin.cert),
      key: await Deno.readTextFile(admin.key),
    };
    const csrf = await rawRequest(
      [
        "POST /api/robots/robot-001/tasks HTTP/1.1",
        `Host: evil.example:${stack.ports.http}`,
        "Origin: https://evil.example",
        "Content-Type: text/plain",
      ],
      body,
      creds,
      bundle,
    );
    assert.equal(csrf.status, 403, csrf.text);
    assert.match(csrf.text, /"code": "bad-host"/);
    // Each rule on its own: the right Host but a foreign Origin; no Origin but text/plain.
    const origin = await rawRequest(
      [
        "POST /api/robots/robot-001/tasks HTTP/1.1",
        `Host: localhost:${stack.ports.http}`,
        "Origin: https://evil.example",
        "Content-Type: application/json",
      ],
      body,
      creds,
      bundle,
    );
    assert.equal(origin.status, 403);
    assert.match(origin.text, /"code": "bad-origin"/);
    const plain = await rawRequest(
      [
        "POST /api/robots/robot-001/tasks HTTP/1.1",
        `Host: localhost:${stack.ports.http}`,
        "Content-Type: text/plain",
      ],
      body,
      creds,
      bundle,
    );
    assert.equal(plain.status, 415);
    const after =
      (await stack.http<{ tasks: unknown[] }>("/api/tasks?limit=1000")).body.tasks.length;
    assert.equal(after, before, "a refused request created a task");
    // Positive control: the same raw request, this server's Host and Origin, JSON: created.
    const ok = await rawRequest(
      [
        "POST /api/robots/robot-001/tasks HTTP/1.1",
        `Host: localhost:${stack.ports.http}`,
        `Origin: https://localhost:${stack.ports.http}`,
        "Content-Type: application/json",
      ],
      body,
      creds,
      bundle,
    );
    assert.equal(ok.status, 201, ok.text);
    const stats = await stack.http<{ http: { refused: Record<string, number> } }>("/api/stats");
    assert.ok(stats.body.http.refused["bad-host"] >= 1);
    assert.ok(stats.body.http.refused["bad-origin"] >= 1);
    assert.ok(stats.body.http.refused["unsupported-media-type"] >= 1);
  },
);

e2e("task cancel of a task never delivered: cancelled at once, never sent", async () => {
  // robot-001 goes away cleanly, so a new task stays pending.
  assert.equal(await stopPidFile(stack.agentPidFile("robot-001"), 15_000), "stopped");
  await waitFor(async () => !(await stack.robot("robot-001")).online, {
    timeoutMs: 15_000,
    intervalMs: 100,
    what: "robot-001 offline at the server",
  });
  const id = await stack.createTask("robot-001", ["echo", "never"], 30);
  const keep = await stack.createTask("robot-001", ["echo", "kept"], 30);
  assert.equal((await stack.task(id)).state, "pending");
  const r = await stack.k8s4r(["task", "cancel", id]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /cancelled \(it had not been sent to its robot\)/);
  const again = await stack.k8s4r(["task", "cancel", id]);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /already cancelled/);
  const t0 = Date.now();
  await stack.mustDevenv(...stack.startArgs());
  stack.remember();
  await stack.waitOnline(stack.robotIds);
  // Positive control: the other pending task is delivered and runs once the robot is back.
  const kept = await stack.waitTask(keep, 30_000);
  metric("operators.pending_task_after_restart_ms", Date.now() - t0);
  assert.equal(kept.state, "done");
  assert.equal(kept.stdout, "kept\n");
  const t = await stack.http<{ state: string; dispatchCount: number; cancelRequestedBy: string }>(
    `/api/tasks/${id}`,
  );
  assert.equal(t.body.state, "cancelled");
  assert.equal(t.body.dispatchCount, 0, "the cancelled task was sent");
  assert.equal(t.body.cancelRequestedBy, `spiffe://${TRUST_DOMAIN}/operator/admin`);
  const log = await Deno.readTextFile(stack.agentLogFile("robot-001"));
  assert.ok(!log.includes(`task.received task=${id}`), "the agent received the cancelled task");
  assert.ok(log.includes(`task.received task=${keep}`), "the agent log names no task at all");
});

e2e("curl with `operator creds` works; without --cert it gets 401", async () => {
  const run = (args: string[]) =>
    new Deno.Command("curl", {
      args: ["-sS", "-w", "\n%{http_code}", ...args],
      stdout: "piped",
      stderr: "piped",
    })
      .output();
  const ok = await run([
    "--cert",
    admin.cert,
    "--key",
    admin.key,
    "--cacert",
    admin.bundle,
    `${admin.serverUrl}/api/robots`,
  ]);
  const text = new TextDecoder().decode(ok.stdout);
  assert.equal(ok.code, 0, new TextDecoder().decode(ok.stderr));
  assert.equal(text.slice(text.lastIndexOf("\n") + 1), "200");
  const robots = JSON.parse(text.slice(0, text.lastIndexOf("\n"))).robots as { id: string }[];
  assert.deepEqual(robots.map((r) => r.id), ["robot-001"]);
  const none = await run(["--cacert", admin.bundle, `${admin.serverUrl}/api/robots`]);
  const t2 = new TextDecoder().decode(none.stdout);
  assert.equal(t2.slice(t2.lastIndexOf("\n") + 1), "401");
});

e2e("operator remove: the next request with a kept copy of the certificate is 403", async () => {
  const dir = `${stack.env.XDG_CONFIG_HOME}/k8s4r/operators/vera`;
  const copy = {
    cert: await Deno.readTextFile(`${dir}/cert.pem`),
    key: await Deno.readTextFile(`${dir}/key.pem`),
    ca: "",
  };
  assert.equal((await asJson(`${stack.api}/api/robots`, clientWith(copy, bundle))).status, 200);
  const rm = await cli(["operator", "remove", "vera"], control);
  assert.equal(rm.code, 0, rm.stderr);
  const after = await asJson(`${stack.api}/api/robots`, clientWith(copy, bundle));
  assert.equal(after.status, 403);
  assert.equal(after.body.code, "no-role");
  assert.equal((await stack.http("/api/robots")).status, 200, "positive control: admin");
});

Deno.test({
  name: "e2e operators: teardown: stop and clean leave no process and no listening port",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await stack.teardown();
  },
});
