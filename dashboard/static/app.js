// hl7mail dashboard: polls the JSON API, follows the log over Server-Sent
// Events. Every value is written with textContent: nothing from the server
// is ever parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_LOG = 1000;
let paused = false;
let held = [];
let source = null;
let lastID = 0;
let refreshTimer = null;

function fmtTime(s) {
  if (!s) return "";
  const d = new Date(s);
  if (isNaN(d) || d.getFullYear() < 2000) return "";
  return d.toLocaleString();
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function num(tr, n, hot) {
  return cell(tr, n || 0, "num" + (hot && n > 0 ? " hot" : ""));
}

function link(el, st) {
  el.textContent = st.state + (st.last_error && st.state !== "up" ? ": " + st.last_error : "");
  el.className = "pill " + (st.state === "up" ? "up" : st.state === "down" ? "down" : "");
  el.title = st.since ? "since " + fmtTime(st.since) + (st.errors ? ", " + st.errors + " errors" : "") : "";
}

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, opts || {}));
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
  return body;
}

function post(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

// loadCluster fills the cluster's tables from the overview: the nodes
// with their last heartbeat, and who runs which role. Hidden alone.
function loadCluster(c) {
  $("cluster").hidden = !c;
  if (!c) return;
  $("cluster-node").textContent = "this node " + c.node + ", lease " + c.lease;
  const nodes = $("cluster-nodes").tBodies[0];
  nodes.replaceChildren();
  for (const n of c.nodes || []) {
    const tr = document.createElement("tr");
    tr.dataset.node = n.name;
    cell(tr, n.name);
    const state = document.createElement("span");
    state.textContent = n.live ? "live" : "gone";
    state.className = "pill " + (n.live ? "up" : "down");
    cell(tr, "").appendChild(state);
    cell(tr, fmtTime(n.seen));
    num(tr, n.roles);
    num(tr, n.taken_today);
    nodes.appendChild(tr);
  }
  const roles = $("cluster-roles").tBodies[0];
  roles.replaceChildren();
  for (const r of c.roles || []) {
    const tr = document.createElement("tr");
    tr.dataset.role = r.role;
    cell(tr, r.role);
    cell(tr, r.node || "none", r.node ? "" : "hot");
    cell(tr, r.running ? "yes" : "not yet", r.running ? "" : "hot");
    roles.appendChild(tr);
  }
}

async function loadOverview() {
  const o = await api("api/overview");
  loadCluster(o.cluster);
  $("self").textContent = o.self + " <" + o.email + ">";
  link($("smtp"), o.smtp);
  link($("imap"), o.imap);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  $("alert-count").textContent = o.open_alerts ? "(" + o.open_alerts + ")" : "";
  const tb = $("partners").tBodies[0];
  tb.replaceChildren();
  const sel = $("log-partner");
  for (const p of o.partners) {
    const tr = document.createElement("tr");
    tr.dataset.partner = p.name;
    cell(tr, p.name).title = p.email + " (" + p.security + ")";
    cell(tr, p.listen);
    num(tr, p.connections < 0 ? "-" : p.connections);
    num(tr, p.in_today);
    num(tr, p.out_today);
    cell(tr, (p.queued_out || 0) + " / " + (p.queued_in || 0), "num");
    num(tr, p.awaiting_receipt);
    num(tr, p.overdue, true);
    const failed = num(tr, p.failed, true);
    if (p.failed > 0) {
      // Every failed, expired or bounced message of the partner back in its queue.
      const b = document.createElement("button");
      b.textContent = "Retry";
      b.title = "send every failed, expired or bounced message of " + p.name + " again, oldest first";
      b.className = "retry-partner";
      b.onclick = async () => {
        try { await post("api/retry", { partner: p.name }); } catch (e) { alert(e.message); }
        refresh();
      };
      failed.appendChild(b);
    }
    num(tr, p.quarantined, true);
    cell(tr, fmtTime(p.last_activity));
    cell(tr, p.smtp.state);
    cell(tr, p.imap.state);
    tb.appendChild(tr);
    if (![...sel.options].some((o) => o.value === p.name)) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = p.name;
      sel.appendChild(opt);
    }
  }
}

// fillList shows one li per item in ul, or a muted line saying empty.
// line(item) gives the li's data key, its text, an optional title, and an
// optional button {label, act}; act returns false when nothing was done.
function fillList(ul, items, empty, line) {
  ul.replaceChildren();
  if (!items.length) {
    const li = document.createElement("li");
    li.textContent = empty;
    li.className = "muted";
    ul.appendChild(li);
  }
  for (const item of items) {
    const { key, text, title, button } = line(item);
    const li = document.createElement("li");
    li.dataset[key] = item.id;
    const t = document.createElement("span");
    t.className = "text";
    t.textContent = text;
    if (title) t.title = title;
    li.appendChild(t);
    if (button) {
      const b = document.createElement("button");
      b.textContent = button.label;
      b.onclick = async () => {
        try {
          if ((await button.act()) === false) return;
        } catch (e) {
          alert(e.message);
        }
        refresh();
      };
      li.appendChild(b);
    }
    ul.appendChild(li);
  }
}

async function loadAlerts() {
  fillList($("alerts"), await api("api/alerts"), "No open alerts.", (a) => ({
    key: "alert",
    text: fmtTime(a.raised) + " " + (a.partner || "-") + ": " + a.text +
      (a.control_id ? " [" + a.control_id + "]" : "") + (a.message_id ? " " + a.message_id : ""),
    button: {
      label: "Acknowledge",
      act: async () => {
        const by = prompt("Acknowledged by (your name):");
        if (!by) return false;
        await post("api/alerts/" + a.id + "/ack", { by });
      },
    },
  }));
}

async function loadQuarantine() {
  fillList($("quarantine"), await api("api/quarantine?limit=50"), "Nothing quarantined.", (q) => ({
    key: "quarantine",
    text: "#" + q.id + " " + fmtTime(q.received) + " " + (q.partner || q.sender) + ": " + q.reason +
      (q.released_by ? " — released by " + q.released_by + " as message " + q.released_as : ""),
    title: q.detail,
    button: q.released_by || q.reason === "replay" ? null : {
      label: "Release",
      act: async () => {
        const by = prompt("Released by (your name):");
        if (!by) return false;
        const note = prompt("Why may this mail be delivered? (recorded)");
        if (!note) return false;
        await post("api/quarantine/" + q.id + "/release", { by, note });
      },
    },
  }));
}

// The receipts (MDNs) and bounces (DSNs) that came back, newest first:
// what each said and what hl7mail made of it.
async function loadReports() {
  fillList($("reports"), await api("api/reports?limit=50"), "No receipts or bounces yet.", (r) => ({
    key: "report",
    text: fmtTime(r.received) + " " + (r.partner || "-") + ": " + r.type.toUpperCase() + " " + r.disposition +
      (r.final_delivery ? " (final destination)" : "") + (r.unsigned ? " (unsigned)" : "") + " → " + r.outcome +
      (r.message ? " [message " + r.message + "]" : "") + (r.detail ? " — " + r.detail : ""),
    title: r.original_message_id,
  }));
}

async function loadMessages() {
  const q = $("search").value.trim();
  const list = await api("api/messages?limit=200&q=" + encodeURIComponent(q));
  const tb = $("messages").tBodies[0];
  tb.replaceChildren();
  for (const m of list) {
    const tr = document.createElement("tr");
    tr.dataset.id = m.id;
    tr.dataset.controlId = m.control_id;
    cell(tr, m.id, "num");
    cell(tr, m.direction);
    cell(tr, m.partner);
    cell(tr, m.message_type);
    cell(tr, m.control_id);
    cell(tr, m.message_id);
    cell(tr, m.state);
    cell(tr, fmtTime(m.received));
    cell(tr, fmtTime(m.updated));
    const td = cell(tr, "");
    if (m.state === "failed" || m.state === "expired" || m.state === "bounced") {
      const b = document.createElement("button");
      b.textContent = "Retry";
      b.onclick = async () => {
        try { await post("api/messages/" + m.id + "/retry", {}); } catch (e) { alert(e.message); }
        refresh();
      };
      td.appendChild(b);
    }
    tb.appendChild(tr);
  }
}

// loadKeys fills the key table (GET /api/keys): a row per key or
// certificate, its state as a class (active, next, retiring, expired,
// revoked) so that the ones that serve no more stand out.
async function loadKeys() {
  const rows = await api("api/keys");
  const tb = $("keys").tBodies[0];
  tb.replaceChildren();
  for (const k of rows) {
    const tr = document.createElement("tr");
    tr.dataset.fingerprint = k.fingerprint;
    tr.dataset.state = k.status;
    cell(tr, k.party);
    cell(tr, k.kind);
    cell(tr, k.fingerprint.slice(-16)).title = k.fingerprint + (k.subject ? " " + k.subject : "");
    cell(tr, fmtTime(k.valid_from));
    cell(tr, k.valid_to ? fmtTime(k.valid_to) : "never");
    cell(tr, (k.roles || []).join(", ") || "-");
    const st = cell(tr, k.status, "state " + k.status);
    if (k.note) st.title = k.note;
    cell(tr, k.days_left === undefined ? "-" : k.days_left, "num" + (k.days_left !== undefined && k.days_left < 30 ? " hot" : ""));
    cell(tr, k.field);
    tb.appendChild(tr);
  }
}

async function refresh() {
  try {
    await Promise.all([loadOverview(), loadAlerts(), loadQuarantine(), loadReports(), loadMessages()]);
    document.dispatchEvent(new Event("hl7mail:refreshed")); // charts.js
  } catch (e) {
    $("updated").textContent = "update failed: " + e.message;
  }
}

// soon refreshes the tables shortly after log activity, at most every 300 ms.
function soon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 300);
}

function logLine(e) {
  const li = document.createElement("li");
  li.className = e.level;
  li.dataset.id = e.id;
  let text = new Date(e.time).toLocaleTimeString() + " " + e.level.padEnd(5) + " " + e.msg;
  for (const [k, v] of Object.entries(e.attrs || {})) text += " " + k + "=" + v;
  li.textContent = text;
  return li;
}

function show(entries) {
  const ol = $("log");
  const atEnd = ol.scrollTop + ol.clientHeight >= ol.scrollHeight - 4;
  for (const e of entries) ol.appendChild(logLine(e));
  while (ol.children.length > MAX_LOG) ol.firstChild.remove();
  if (atEnd) ol.scrollTop = ol.scrollHeight;
}

function connect(fresh) {
  if (source) source.close();
  const params = new URLSearchParams({ level: $("log-level").value, partner: $("log-partner").value });
  if (fresh) {
    $("log").replaceChildren();
    held = [];
  } else if (lastID) {
    params.set("since", lastID);
  }
  // The browser resends Last-Event-ID by itself when it reconnects.
  source = new EventSource("api/log?" + params);
  source.addEventListener("log", (ev) => {
    const e = JSON.parse(ev.data);
    lastID = e.id;
    if (paused) held.push(e);
    else show([e]);
    soon();
  });
  source.onopen = () => { $("log-state").textContent = "live"; };
  source.onerror = () => { $("log-state").textContent = "reconnecting…"; };
}

$("log-pause").onclick = () => {
  paused = !paused;
  $("log-pause").textContent = paused ? "Resume" : "Pause";
  if (!paused) { show(held); held = []; }
  $("log-state").textContent = paused ? "paused" : "live";
};
$("log-level").onchange = () => connect(true);
$("log-partner").onchange = () => connect(true);
let searchTimer = null;
$("search").oninput = () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(loadMessages, 200);
};

refresh();
setInterval(refresh, 5000);
// Keys change at a reload, or with the date: once a minute is enough.
loadKeys().catch((e) => { $("updated").textContent = "update failed: " + e.message; });
setInterval(() => loadKeys().catch(() => {}), 60000);
connect(true);
