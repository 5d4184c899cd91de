// The k8s4r dashboard: plain Web Components (Custom Elements), no framework and no build step.
// It reads the fleet server's API with the session cookie of a one-time login
// (`k8s4r dashboard`), and follows the fleet's events live through Server-Sent Events.
// Every value from the API is escaped before it reaches the page (esc()); the server's
// Content-Security-Policy allows no inline script or style.

const FINAL = new Set(["done", "failed", "refused", "expired", "cancelled"]);

/** HTML-escapes a value for text and attribute positions. */
function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** A JSON API call with the session cookie; throws an Error with the API's message. */
async function api(path, opts = {}) {
  const init = { credentials: "same-origin", headers: { accept: "application/json" } };
  if (opts.body !== undefined) {
    init.method = opts.method ?? "POST";
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(opts.body);
  }
  const res = await fetch(path, init);
  let body = {};
  try {
    body = await res.json();
  } catch { /* not JSON */ }
  if (!res.ok) {
    const err = new Error(body.error ?? `HTTP ${res.status}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

/** "12s", "4m 10s", "2h 5m", "3d 4h". */
function span(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function ago(iso) {
  const t = Date.parse(iso);
  return Number.isFinite(t) ? `${span(Date.now() - t)} ago` : "-";
}

/** "in 42m 10s" (the SVID expiry countdown), "EXPIRED 3s ago". */
function countdown(iso) {
  const t = Date.parse(iso);
  if (!Number.isFinite(t)) return { text: "-", cls: "muted" };
  const left = t - Date.now();
  if (left <= 0) return { text: `EXPIRED ${span(-left)} ago`, cls: "expired" };
  return { text: `in ${span(left)}`, cls: left < 5 * 60_000 ? "soon" : "" };
}

function who(spiffeId) {
  const m = /^spiffe:\/\/[^/]+\/operator\/([^/]+)$/.exec(spiffeId ?? "");
  return m ? m[1] : (spiffeId ?? "-");
}

/** argv from a command line: words, with '...' and "..." quoting (no shell runs it). */
export function parseCommand(line) {
  const out = [];
  let cur = "";
  let quote = "";
  let has = false;
  for (const c of line) {
    if (quote) {
      if (c === quote) quote = "";
      else cur += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      has = true;
    } else if (/\s/.test(c)) {
      if (has || cur) out.push(cur);
      cur = "";
      has = false;
    } else {
      cur += c;
    }
  }
  if (quote) throw new Error(`unterminated ${quote}`);
  if (has || cur) out.push(cur);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The shared state: who I am, the robots, the counters, the events. Views re-render on change.

const store = {
  me: undefined,
  robots: [],
  stats: undefined,
  events: [],
  listeners: new Set(),
  emit() {
    for (const l of this.listeners) l();
  },
  on(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  },
  async refresh() {
    const [robots, stats] = await Promise.all([api("/api/robots"), api("/api/stats")]);
    this.robots = robots.robots;
    this.stats = stats;
    this.emit();
  },
  /** A live event: the robot's state changes at once (no waiting for the next refresh). */
  apply(e) {
    this.events.push(e);
    if (this.events.length > 300) this.events.splice(0, this.events.length - 300);
    const r = e.robotId && this.robots.find((x) => x.id === e.robotId);
    if (r && (e.kind === "online" || e.kind === "offline")) {
      r.state = e.kind;
      r.online = e.kind === "online";
      r.offlineReason = e.detail?.reason ?? null;
      if (e.kind === "online") r.lastSeen = e.at;
    }
    this.emit();
    // The counters and everything else follow shortly.
    clearTimeout(this.soon);
    this.soon = setTimeout(() => this.refresh().catch(() => {}), 300);
  },
};

function canWrite() {
  return store.me?.role === "operator";
}

// ---------------------------------------------------------------------------------------------
// <k8s4r-app>: header, navigation (#/, #/robots/ID, #/tasks), the event stream.

class App extends HTMLElement {
  async connectedCallback() {
    try {
      store.me = await api("/api/whoami");
    } catch (err) {
      this.innerHTML = `<main><section><h2>Not logged in</h2>
        <p>${esc(err.message)}</p>
        <p>On a host with your operator credentials, run <code>k8s4r dashboard</code> and open
        the one-time link it prints.</p></section></main>`;
      return;
    }
    try {
      await store.refresh();
      const ev = await api("/api/events?limit=200");
      store.events = ev.events;
    } catch (err) {
      this.innerHTML = `<main><p class="error">${esc(err.message)}</p></main>`;
      return;
    }
    this.stream();
    // A session that ended (logout elsewhere, expiry, a server restart): back to the notice.
    setInterval(() => store.refresh().catch((e) => e.status === 401 && location.reload()), 5000);
    setInterval(() => tick(), 1000);
    addEventListener("hashchange", () => this.route());
    this.route();
  }

  stream() {
    const es = new EventSource("/api/events/stream");
    es.addEventListener("fleet", (m) => {
      try {
        store.apply(JSON.parse(m.data));
      } catch { /* a malformed frame is skipped */ }
    });
    es.addEventListener("open", () => {
      document.body.dataset.live = "1";
    });
    es.addEventListener("error", () => {
      document.body.dataset.live = "0";
    });
  }

  route() {
    const h = location.hash.replace(/^#/, "") || "/";
    const m = /^\/robots\/([a-z0-9-]+)$/.exec(h);
    const view = m
      ? `<k8s4r-robot robot="${esc(m[1])}"></k8s4r-robot>`
      : h === "/tasks"
      ? `<k8s4r-tasks></k8s4r-tasks>`
      : `<k8s4r-fleet></k8s4r-fleet>`;
    const nav = (href, label, on) => `<a href="${href}" class="${on ? "active" : ""}">${label}</a>`;
    this.innerHTML = `<header><h1>k8s4r fleet</h1><nav>
        ${nav("#/", "Fleet", !m && h !== "/tasks")}${nav("#/tasks", "Tasks", h === "/tasks")}
      </nav><span class="me" id="me">${esc(store.me.operator)} (${esc(store.me.role)})</span>
      <button id="logout">Log out</button></header><main>${view}</main>`;
    this.querySelector("#logout").addEventListener("click", async () => {
      await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin" });
      location.reload();
    });
  }
}

/** Updates every countdown and "ago" in place, once a second. */
function tick() {
  for (const el of document.querySelectorAll("[data-until]")) {
    const c = countdown(el.dataset.until);
    el.textContent = c.text;
    el.className = c.cls;
  }
  for (const el of document.querySelectorAll("[data-since]")) {
    el.textContent = ago(el.dataset.since);
  }
}

/** A base for views that re-render when the store changes. */
class View extends HTMLElement {
  connectedCallback() {
    this.off = store.on(() => this.render());
    this.render();
  }
  disconnectedCallback() {
    this.off?.();
  }
}

function robotState(r) {
  return r.state ?? (r.online ? "online" : "offline");
}

function stateBadge(state, extra = "") {
  return `<span class="state ${esc(state)}">${esc(state)}${extra}</span>`;
}

// ---------------------------------------------------------------------------------------------
// <k8s4r-fleet>: counts, the robot table, the events timeline.

class Fleet extends View {
  render() {
    const rs = store.robots;
    const n = (s) => rs.filter((r) => robotState(r) === s).length;
    const tasks = store.stats?.tasks ?? {};
    const active = ["pending", "dispatched", "accepted", "running", "cancelling"]
      .reduce((a, s) => a + (tasks[s] ?? 0), 0);
    const card = (id, v, l) =>
      `<div class="card" id="${id}"><div class="n">${esc(v)}</div><div class="l">${l}</div></div>`;
    const rows = rs.map((r) => {
      const st = robotState(r);
      const exp = countdown(r.svidExpiresAt);
      const load = r.device?.load?.[0];
      return `<tr data-robot="${esc(r.id)}" data-state="${esc(st)}">
        <td><a href="#/robots/${esc(r.id)}">${esc(r.id)}</a></td>
        <td class="robot-state">${
        stateBadge(st, st === "offline" && r.offlineReason ? ` (${esc(r.offlineReason)})` : "")
      }</td>
        <td data-since="${esc(r.lastSeen)}">${esc(ago(r.lastSeen))}</td>
        <td><span data-until="${esc(r.svidExpiresAt ?? "")}" class="${exp.cls}">${
        esc(exp.text)
      }</span></td>
        <td>${esc(r.agentVersion ?? "-")}</td>
        <td>${load === undefined ? "-" : esc(load.toFixed(2))}</td>
      </tr>`;
    }).join("");
    this.innerHTML = `<div class="cards">
        ${card("count-robots", rs.length, "robots")}${card("count-online", n("online"), "online")}
        ${card("count-offline", n("offline"), "offline")}${
      card("count-unknown", n("unknown"), "unknown")
    }
        ${card("count-active", active, "tasks running or queued")}
        ${card("count-done", tasks.done ?? 0, "tasks done")}
        ${card("count-failed", (tasks.failed ?? 0) + (tasks.refused ?? 0), "failed or refused")}
      </div>
      <section><h2>Robots</h2>
      <table id="robots"><thead><tr><th>robot</th><th>state</th><th>last seen</th>
        <th>SVID expires</th><th>agent</th><th>load (1m)</th></tr></thead>
      <tbody>${rows || `<tr><td colspan="6" class="muted">no robot has registered yet</td></tr>`}
      </tbody></table></section>
      <section><h2>Events <span class="muted" id="live"></span></h2>${
      timeline(store.events)
    }</section>`;
  }
}

function timeline(events, robotId) {
  const list = (robotId ? events.filter((e) => e.robotId === robotId) : events).slice(-100)
    .reverse();
  if (list.length === 0) return `<p class="muted">no events yet</p>`;
  return `<ul class="timeline" id="timeline">${
    list.map((e) =>
      `<li data-kind="${esc(e.kind)}"><span class="muted">${
        esc(new Date(e.at).toLocaleTimeString())
      }</span> <span class="kind ${esc(e.kind)}">${esc(e.kind)}</span> ${esc(e.text)}</li>`
    ).join("")
  }</ul>`;
}

// ---------------------------------------------------------------------------------------------
// Tasks: one table for both the task list and a robot's recent tasks.

function taskRows(tasks, { robotColumn }) {
  return tasks.map((t) => {
    const out = [t.stdout, t.stderr].filter(Boolean).join("");
    const detail = t.error ? `<div class="error">${esc(t.error)}</div>` : "";
    const cancel = canWrite() && !FINAL.has(t.state)
      ? `<button class="cancel" data-task="${esc(t.id)}">Cancel</button>`
      : "";
    const exit = t.state === "done" && t.exitCode !== null && t.exitCode !== 0
      ? ` (exit ${esc(t.exitCode)})`
      : "";
    return `<tr data-task="${esc(t.id)}" data-state="${esc(t.state)}">
      <td><code>${esc(t.command.join(" "))}</code><div class="muted">${esc(t.id)}</div></td>
      ${robotColumn ? `<td><a href="#/robots/${esc(t.robotId)}">${esc(t.robotId)}</a></td>` : ""}
      <td>${stateBadge(t.state, exit)}${detail}</td>
      <td class="created-by">${esc(who(t.createdBy))}</td>
      <td data-since="${esc(t.createdAt)}">${esc(ago(t.createdAt))}</td>
      <td>${
      out ? `<pre class="output" data-task="${esc(t.id)}">${esc(out)}</pre>` : ""
    }${cancel}</td>
    </tr>`;
  }).join("");
}

function taskTable(tasks, opts) {
  return `<table class="tasks"><thead><tr><th>command</th>${
    opts.robotColumn ? "<th>robot</th>" : ""
  }<th>state</th><th>created by</th><th>created</th><th>output</th></tr></thead><tbody>${
    taskRows(tasks, opts) || `<tr><td colspan="6" class="muted">no tasks</td></tr>`
  }</tbody></table>`;
}

function wireCancel(root, after) {
  for (const b of root.querySelectorAll("button.cancel")) {
    b.addEventListener("click", async () => {
      b.disabled = true;
      try {
        await api(`/api/tasks/${encodeURIComponent(b.dataset.task)}/cancel`, { body: {} });
      } catch (err) {
        alert(err.message);
      }
      after();
    });
  }
}

class Tasks extends HTMLElement {
  connectedCallback() {
    this.load();
    this.timer = setInterval(() => this.load(), 2000);
  }
  disconnectedCallback() {
    clearInterval(this.timer);
  }
  async load() {
    let page;
    try {
      page = await api("/api/tasks?limit=100");
    } catch (err) {
      this.innerHTML = `<p class="error">${esc(err.message)}</p>`;
      return;
    }
    this.innerHTML = `<section><h2>Tasks</h2>${
      taskTable(page.tasks, { robotColumn: true })
    }</section>`;
    wireCancel(this, () => this.load());
  }
}

// ---------------------------------------------------------------------------------------------
// <k8s4r-robot robot="ID">: details, heartbeats and their loss, recent tasks, run (operators).

class Robot extends HTMLElement {
  connectedCallback() {
    this.robotId = this.getAttribute("robot");
    this.innerHTML = `<p class="muted">Loading ${esc(this.robotId)}...</p>`;
    this.load();
    this.timer = setInterval(() => this.load(), 2000);
    this.off = store.on(() => this.renderState());
  }
  disconnectedCallback() {
    clearInterval(this.timer);
    this.off?.();
  }
  async load() {
    let robot, beats, tasks;
    try {
      [robot, beats, tasks] = await Promise.all([
        api(`/api/robots/${encodeURIComponent(this.robotId)}`),
        api(`/api/robots/${encodeURIComponent(this.robotId)}/heartbeats`),
        api(`/api/robots/${encodeURIComponent(this.robotId)}/tasks?limit=20`),
      ]);
    } catch (err) {
      this.innerHTML = `<p class="error">${esc(err.message)}</p>`;
      return;
    }
    this.robot = robot;
    this.render(robot, beats, tasks.tasks);
  }
  renderState() {
    const live = store.robots.find((r) => r.id === this.robotId);
    const el = this.querySelector("#robot-state");
    if (live && el) {
      el.innerHTML = stateBadge(robotState(live));
      el.dataset.state = robotState(live);
    }
  }
  render(r, beats, tasks) {
    const st = robotState(r);
    const total = beats.received + beats.missing;
    const loss = total ? (100 * beats.missing / total).toFixed(1) : "0.0";
    const strip = beats.recent.map((b) =>
      `${'<span class="beat lost"></span>'.repeat(Math.min(b.missing, 20))}<span class="beat" ` +
      `title="seq ${esc(b.seq)} at ${esc(b.at)}"></span>`
    ).join("");
    const exp = countdown(r.svidExpiresAt);
    const form = canWrite()
      ? `<form class="run" id="run-form"><input type="text" id="command" name="command"
          placeholder="echo hi" autocomplete="off" required>
          <label>timeout <input type="number" id="timeout" value="60" min="1" max="86400"></label>
          <button type="submit" id="run">Run</button></form><p id="run-error" class="error"></p>`
      : `<p class="muted" id="read-only">You are a ${
        esc(store.me.role)
      }: you can see tasks but not run or cancel them.</p>`;
    const focus = document.activeElement?.id === "command";
    const typed = this.querySelector("#command")?.value ?? "";
    this.innerHTML = `<p><a href="#/">&larr; fleet</a></p>
      <section><h2>${esc(r.id)} <span id="robot-state" data-state="${esc(st)}">${
      stateBadge(st)
    }</span></h2>
      <table><tbody>
        <tr><th>SPIFFE ID</th><td><code>${esc(r.spiffeId ?? "-")}</code></td></tr>
        <tr><th>last seen</th><td data-since="${esc(r.lastSeen)}">${esc(ago(r.lastSeen))}</td></tr>
        <tr><th>offline reason</th><td>${esc(r.offlineReason ?? "-")}</td></tr>
        <tr><th>SVID expires</th><td><span data-until="${
      esc(r.svidExpiresAt ?? "")
    }" class="${exp.cls}">${esc(exp.text)}</span></td></tr>
        <tr><th>agent</th><td>${esc(r.agentVersion ?? "-")}</td></tr>
        <tr><th>device</th><td>${
      r.device
        ? esc(
          `${r.device.hostname}, ${r.device.os}/${r.device.arch}, ${r.device.cpus} CPUs, load ${
            r.device.load.join(" ")
          }`,
        )
        : "-"
    }</td></tr>
      </tbody></table></section>
      <section><h2>Heartbeats</h2>
        <p id="heartbeats">every ${esc(beats.intervalSeconds ?? "?")}s: <b>${
      esc(beats.received)
    }</b> received, <b>${esc(beats.missing)}</b> missing (${loss} % lost)</p>
        <div class="beats" title="the last heartbeats, oldest first; red: missing">${
      strip || '<span class="muted">none since the server started</span>'
    }</div></section>
      <section><h2>Tasks</h2>${form}${taskTable(tasks, { robotColumn: false })}</section>
      <section><h2>Events</h2>${timeline(store.events, r.id)}</section>`;
    const input = this.querySelector("#command");
    if (input) {
      input.value = typed;
      if (focus) input.focus();
    }
    this.querySelector("#run-form")?.addEventListener("submit", (e) => this.run(e));
    wireCancel(this, () => this.load());
  }
  async run(e) {
    e.preventDefault();
    const errEl = this.querySelector("#run-error");
    const input = this.querySelector("#command");
    let command;
    try {
      command = parseCommand(input.value);
      if (command.length === 0) throw new Error("type a command, e.g. echo hi");
    } catch (err) {
      errEl.textContent = err.message;
      return;
    }
    try {
      await api(`/api/robots/${encodeURIComponent(this.robotId)}/tasks`, {
        body: { command, timeoutSeconds: Number(this.querySelector("#timeout").value) || 60 },
      });
      input.value = "";
      errEl.textContent = "";
    } catch (err) {
      errEl.textContent = err.message;
    }
    this.load();
  }
}

customElements.define("k8s4r-app", App);
customElements.define("k8s4r-fleet", Fleet);
customElements.define("k8s4r-tasks", Tasks);
customElements.define("k8s4r-robot", Robot);
