/**
 * The dashboard in a real browser against a real stack (`devenv start` in a temp dir: real
 * SPIRE, Mosquitto, fleet server and agent): Debian's Chromium driven by npm puppeteer-core,
 * trusting the fleet's SPIRE CA through an NSS database in its own HOME (tests/helpers/
 * browser.ts), never by ignoring certificate errors.
 *
 * - a browser WITHOUT the CA refuses the server (positive control of the trust setup);
 * - log in through the one-time URL of `k8s4r dashboard --print-url` (its page names the
 *   operator; its button logs in); see robot-001 online;
 * - the URL fails a second time, and after it expired (the stack's logins live 8 s here:
 *   K8S4R_DASHBOARD_LOGIN_TTL; the default is 120 s);
 * - run `echo hi` from the robot page and see `hi`, and the task list names its operator;
 * - a task whose output and command are `<img src=x onerror=alert(1)>`, and a program of that
 *   name the robot refuses: shown as text in the rows and the timeline, no element, no alert;
 * - a viewer gets no run button, and the API refuses its session's POST anyway;
 * - `kill -9` the agent and see the robot turn offline in the page within 3 s (measured).
 *
 * Screenshots go to a directory the test prints (`TEST-ARTIFACTS <dir>`).
 */
import assert from "node:assert/strict";
import type { Browser, Page } from "puppeteer-core";
import { waitFor } from "../../src/process/mod.ts";
import { artifactsDir, launchBrowser, type TestBrowser } from "../helpers/browser.ts";
import { E2eStack, metric } from "./stack.ts";

const LOGIN_TTL_S = 8;
const stack = await E2eStack.create({ heartbeatSeconds: 1, robots: 1 });
stack.env.K8S4R_DASHBOARD_LOGIN_TTL = String(LOGIN_TTL_S);
const e2e = stack.caseRegistrar("e2e dashboard: ");
let artifacts = "";
let browser: TestBrowser | undefined;
let page: Page | undefined;

/** The CLI on the control host: devenv's roles file and SPIRE admin socket. */
const control = stack.controlEnv();

/** The CLI with `extra` in its env for this call. */
const cli = (args: string[], extra: Record<string, string> = {}) =>
  stack.k8s4r(args, { env: extra });

/** A one-time login URL, as a person gets it: `k8s4r dashboard --print-url`. */
async function loginUrl(operator = "admin"): Promise<string> {
  const r = await cli(["dashboard", "--print-url", "--operator", operator]);
  assert.equal(r.code, 0, `k8s4r dashboard: ${r.stdout}\n${r.stderr}`);
  const url = r.stdout.trim();
  assert.match(url, /^https:\/\/localhost:\d+\/dashboard\/login\?token=[A-Za-z0-9_-]{43}$/);
  assert.match(r.stderr, /one-time login for (admin|vera)/);
  return url;
}

/** Opens a login URL and presses its button, as a person does; the answer of the button. */
async function logIn(p: Page, url: string, operator = "admin") {
  const look = await p.goto(url);
  assert.equal(look?.status(), 200);
  assert.equal(await p.$eval("#login", (e) => e.textContent), `Log in as ${operator}`);
  const [res] = await Promise.all([p.waitForNavigation(), p.click("#login")]);
  return res;
}

async function shot(p: Page, name: string): Promise<void> {
  await p.screenshot({ path: `${artifacts}/${name}.png`, fullPage: true });
}

async function newPage(b: Browser): Promise<Page> {
  const p = await b.newPage();
  await p.setViewport({ width: 1100, height: 700 });
  return p;
}

e2e("the stack starts; a browser without the fleet's CA refuses the server", async () => {
  await stack.start();
  stack.started = true;
  artifacts = await artifactsDir("dashboard");
  const url = await loginUrl();
  const untrusting = await launchBrowser();
  try {
    const p = await newPage(untrusting.browser);
    await assert.rejects(() => p.goto(url), /ERR_CERT_AUTHORITY_INVALID/);
  } finally {
    await untrusting.close();
  }
  // The refused handshake did not use the login up: it works in a browser that trusts the CA.
  browser = await launchBrowser({
    trustBundlePem: await Deno.readTextFile(stack.layout.caBundleFile),
  });
  page = await newPage(browser.browser);
  const res = await logIn(page, url);
  assert.equal(res?.status(), 200);
  assert.equal(new URL(page.url()).pathname, "/dashboard/", "redirected, the token left behind");
});

e2e("log in through the one-time URL and see robot-001 online", async () => {
  const p = page!;
  await p.waitForSelector('tr[data-robot="robot-001"][data-state="online"]', { timeout: 15_000 });
  assert.equal(await p.$eval("#me", (e) => e.textContent), "admin (operator)");
  assert.equal(await p.$eval("#count-online .n", (e) => e.textContent), "1");
  // The cookie is HttpOnly, Secure and SameSite=Strict, and invisible to the page's scripts.
  const cookies = await p.cookies();
  const c = cookies.find((x) => x.name === "__Host-k8s4r_session");
  assert.ok(c, JSON.stringify(cookies));
  assert.equal(c.httpOnly, true);
  assert.equal(c.secure, true);
  assert.equal(c.sameSite, "Strict");
  assert.equal(await p.evaluate("document.cookie"), "");
  await p.waitForSelector('#timeline li[data-kind="online"]', { timeout: 5000 });
  await shot(p, "fleet");
});

e2e("the login URL fails a second time and after it expired", async () => {
  const used = page!.url(); // not the token: take a fresh one and use it twice
  assert.doesNotMatch(used, /token=/);
  const url = await loginUrl();
  const p = await newPage(browser!.browser);
  try {
    // A second browser context would keep the first session apart; the point is the token.
    assert.equal((await logIn(p, url))?.status(), 200);
    const second = await p.goto(url);
    assert.equal(second?.status(), 401);
    assert.match(await p.content(), /used already/);
    // Expiry: a fresh URL, unused until its lifetime has passed.
    const late = await loginUrl();
    const issued = Date.now();
    await waitFor(() => Date.now() - issued > LOGIN_TTL_S * 1000 + 500, {
      timeoutMs: (LOGIN_TTL_S + 5) * 1000,
      intervalMs: 200,
      what: "the login URL to expire",
    });
    const expired = await p.goto(late);
    assert.equal(expired?.status(), 401);
    assert.match(await p.content(), /expired/);
    await shot(p, "login-refused");
  } finally {
    await p.close();
  }
});

e2e("run `echo hi` from the robot page and see hi; the task list names its operator", async () => {
  const p = page!;
  await p.goto(`${stack.api}/dashboard/#/robots/robot-001`);
  await p.waitForSelector("#run", { timeout: 10_000 });
  await p.type("#command", "echo hi");
  await p.click("#run");
  // (A string: it runs in the page, whose DOM the test's type checker does not know.)
  const out = await p.waitForFunction(
    `[...document.querySelectorAll("tr[data-state='done'] pre.output")]
       .some((e) => e.textContent === "hi\\n")`,
    { timeout: 30_000 },
  );
  assert.ok(out);
  await shot(p, "robot");
  await p.goto(`${stack.api}/dashboard/#/tasks`);
  await p.waitForSelector("table.tasks tr[data-state='done'] td.created-by", { timeout: 10_000 });
  const row = await p.$eval("table.tasks tr[data-state='done']", (tr) => ({
    by: tr.querySelector("td.created-by")?.textContent,
    cmd: tr.querySelector("code")?.textContent,
    out: tr.querySelector("pre.output")?.textContent,
  }));
  assert.deepEqual(row, { by: "admin", cmd: "echo hi", out: "hi\n" });
  await shot(p, "tasks");
});

e2e("task output, command and a robot's refusal are shown as text, never as HTML", async () => {
  const p = page!;
  // An alert would be the injection running (the CSP blocks inline handlers as a second
  // layer, so the DOM is checked too: an <img> in a row means the escaping failed).
  const dialogs: string[] = [];
  const onDialog = (d: { message(): string; dismiss(): Promise<void> }) => {
    dialogs.push(d.message());
    d.dismiss().catch(() => {});
  };
  p.on("dialog", onDialog);
  try {
    const xss = "<img src=x onerror=alert(1)>";
    await p.goto(`${stack.api}/dashboard/#/robots/robot-001`);
    await p.waitForSelector("#run", { timeout: 10_000 });
    await p.type("#command", `echo '${xss}'`);
    await p.click("#run");
    await p.waitForFunction(
      `[...document.querySelectorAll("tr[data-state='done'] pre.output")]
         .some((e) => e.textContent === ${JSON.stringify(`${xss}\n`)})`,
      { timeout: 30_000 },
    );
    // A program named like HTML: the robot refuses it, its error names it (row and timeline).
    await p.type("#command", `'${xss}'`);
    await p.click("#run");
    await p.waitForFunction(
      `[...document.querySelectorAll("tr[data-state='refused'] .error")]
         .some((e) => e.textContent.includes(${JSON.stringify(xss)}))`,
      { timeout: 30_000 },
    );
    const noImg = async (where: string) =>
      assert.equal(
        await p.$$eval("main img", (l) => l.length),
        0,
        `an element from a value: ${where}`,
      );
    await noImg("robot page");
    await p.goto(`${stack.api}/dashboard/#/`);
    await p.waitForFunction(
      `[...document.querySelectorAll("#timeline li[data-kind='task-refused']")]
         .some((e) => e.textContent.includes(${JSON.stringify(xss)}))`,
      { timeout: 10_000 },
    );
    await noImg("fleet page and timeline");
    await p.goto(`${stack.api}/dashboard/#/tasks`);
    await p.waitForFunction(
      `[...document.querySelectorAll("table.tasks code")]
         .some((e) => e.textContent === ${JSON.stringify(`echo ${xss}`)})`,
      { timeout: 10_000 },
    );
    await noImg("task list");
    assert.deepEqual(dialogs, []);
    await shot(p, "escaped");
  } finally {
    p.off("dialog", onDialog);
  }
});

e2e("a viewer gets no run button, and the API refuses its session anyway", async () => {
  const add = await cli(["operator", "add", "vera", "--role", "viewer"], control);
  assert.equal(add.code, 0, `operator add: ${add.stdout}\n${add.stderr}`);
  const ctx = await browser!.browser.createBrowserContext();
  try {
    const p = await ctx.newPage();
    await p.setViewport({ width: 1100, height: 700 });
    await logIn(p, await loginUrl("vera"), "vera");
    await p.waitForSelector('tr[data-robot="robot-001"]', { timeout: 15_000 });
    assert.equal(await p.$eval("#me", (e) => e.textContent), "vera (viewer)");
    await p.goto(`${stack.api}/dashboard/#/robots/robot-001`);
    await p.waitForSelector("#read-only", { timeout: 10_000 });
    assert.equal(await p.$("#run"), null, "no run button for a viewer");
    assert.equal(await p.$("button.cancel"), null, "no cancel button for a viewer");
    // The page's own origin and cookie, a JSON POST: refused by the role, not by the UI.
    const r = await p.evaluate(async () => {
      const res = await fetch("/api/robots/robot-001/tasks", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ command: ["echo", "nope"] }),
      });
      return { status: res.status, body: await res.json() };
    });
    assert.equal(r.status, 403, JSON.stringify(r));
    assert.equal(r.body.code, "forbidden");
    await shot(p, "viewer");
  } finally {
    await ctx.close();
  }
});

e2e("kill -9 the agent: the browser shows robot-001 offline within 3 s", async () => {
  const p = page!;
  await p.goto(`${stack.api}/dashboard/#/`);
  await p.waitForSelector('tr[data-robot="robot-001"][data-state="online"]', { timeout: 15_000 });
  // The page follows the fleet's events (its SSE stream is open).
  await p.waitForFunction(`document.body.dataset.live === "1"`, { timeout: 10_000 });
  const agent = stack.pid(stack.agentPidFile("robot-001"));
  assert.ok(agent, "robot-001's agent runs");
  const t0 = Date.now();
  Deno.kill(agent.pid, "SIGKILL");
  await p.waitForSelector('tr[data-robot="robot-001"][data-state="offline"]', { timeout: 10_000 });
  const ms = Date.now() - t0;
  metric("dashboard.kill9_to_offline_in_browser_ms", ms);
  assert.match(
    await p.$eval('tr[data-robot="robot-001"] .robot-state', (e) => e.textContent ?? ""),
    /offline \(connection lost\)/,
  );
  await p.waitForSelector('#timeline li[data-kind="offline"]', { timeout: 5000 });
  await shot(p, "offline");
  assert.ok(ms < 3000, `robot-001 turned offline in the browser ${ms} ms after kill -9`);
});

e2e("teardown: the browser and the stack are gone", async () => {
  await page?.close().catch(() => {});
  await browser?.close();
  browser = undefined;
  await stack.teardown();
});
