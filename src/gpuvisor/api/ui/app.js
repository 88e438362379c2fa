// gpuvisor dashboard: signs in with an API key (kept in sessionStorage), polls
// /api/v1/dashboard every second and redraws in place. No dependencies, no build step.
"use strict";

const KEY_STORAGE = "gpuvisor.key";
const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

let timer = null;
let lastOk = 0;

// ---- formatting ------------------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "Ki", "Mi", "Gi", "Ti"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 1 : 0)) + units[i];
}
function ms(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const v = seconds * 1000;
  return (v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0)) + " ms";
}
function pct(x) {
  if (x === null || x === undefined) return "–";
  return (x * 100).toFixed(x < 0.1 && x > 0 ? 1 : 0) + "%";
}
function ago(epochSeconds) {
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (s < 60) return s.toFixed(0) + "s";
  if (s < 3600) return (s / 60).toFixed(0) + "m";
  return (s / 3600).toFixed(1) + "h";
}
// A stable colour per tenant, so a tenant looks the same on every bar.
function colour(name) {
  let h = 0;
  for (const c of name || "") h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${h % 360}, 55%, 45%)`;
}

// h("td", {class: "num"}, "text", childNode...): elements built with textContent only.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// ---- signing in and out ------------------------------------------------------------------

function show(state, message) {
  const signedIn = state === "signed-in";
  $("signin").hidden = signedIn;
  $("dashboard").hidden = !signedIn;
  $("sign-out").hidden = !signedIn;
  $("viewer").hidden = !signedIn;
  $("freshness").textContent = "";
  const error = $("signin-error");
  error.hidden = !message;
  error.textContent = message || "";
  document.body.dataset.state = state;
  if (!signedIn) $("key").focus();
}

async function fetchDashboard(key) {
  const response = await fetch("/api/v1/dashboard", {
    headers: { Authorization: "Bearer " + key },
    cache: "no-store",
  });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  return { status: response.status, body };
}

async function signIn(key) {
  let result;
  try {
    result = await fetchDashboard(key);
  } catch (_) {
    show("signed-out", "Cannot reach the node: is it running, and is this page served by it?");
    return;
  }
  if (result.status === 401) {
    sessionStorage.removeItem(KEY_STORAGE);
    show("wrong-key", "That key was not accepted (401): it is unknown, revoked or expired. " +
      "Check it, or create one with 'gpuvisor keys create'.");
    return;
  }
  if (result.status !== 200) {
    show("signed-out", `The node answered ${result.status}: ${(result.body && result.body.error) || "no details"}`);
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  show("signed-in");
  render(result.body);
  schedule();
}

function signOut(message) {
  clearTimeout(timer);
  timer = null;
  sessionStorage.removeItem(KEY_STORAGE);
  $("key").value = "";
  show("signed-out", message);
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(poll, POLL_MS);
}

async function poll() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (!key) return signOut();
  try {
    const { status, body } = await fetchDashboard(key);
    if (status === 401) return signOut("Your key stopped working (revoked or expired): sign in again.");
    if (status === 200) {
      $("connection").hidden = true;
      render(body);
    } else {
      connectionProblem(`The node answered ${status}; retrying.`);
    }
  } catch (_) {
    connectionProblem("The node is not answering; showing the last data and retrying.");
  }
  schedule();
}

function connectionProblem(text) {
  const el = $("connection");
  el.hidden = false;
  el.textContent = text;
}

// ---- rendering ------------------------------------------------------------------------------

function render(data) {
  lastOk = Date.now();
  const v = data.viewer;
  $("viewer").textContent = v.tenant ? `tenant ${v.tenant}` : v.role;
  $("node-info").textContent = `${data.node.cluster} · v${data.node.version}`;
  $("share-window").textContent = `device time over the last ${data.node.shareWindow.toFixed(0)} s against what each is guaranteed`;
  $("latency-window").textContent = `latency over the last ${data.node.latencyWindow.toFixed(0)} s`;
  renderAttention(data.attention);
  renderDevices(data.devices);
  renderTenants(data.tenants);
  renderDeployments(data.deployments);
  renderPending(data.pending);
  document.body.dataset.updated = String(data.generatedAt);
}

function renderAttention(items) {
  $("attention").replaceChildren(...items.map((i) => h("li", { class: i.level }, i.text)));
}

function renderDevices(devices) {
  $("devices").replaceChildren(...devices.map((d) => {
    const total = Math.max(1, d.memoryTotal);
    const segments = d.slices.map((s) => {
      const width = (100 * s.memoryLimit) / total;
      const used = s.memoryUsed === null ? 0 : Math.min(100, (100 * s.memoryUsed) / Math.max(1, s.memoryLimit));
      return h("div", {
        class: "seg", "data-slice": s.slice, style: `width:${width}%;background:${colour(s.tenant)}`,
        title: `${s.slice} (${s.state}): ${bytes(s.memoryUsed)} used of ${bytes(s.memoryLimit)} cap`,
      }, h("div", { class: "used", style: `width:${used}%` }), h("span", {}, s.deployment));
    });
    if (d.others) {
      segments.push(h("div", {
        class: "seg others", style: `width:${(100 * d.others.memoryLimit) / total}%`,
        title: `other tenants: ${d.others.slices} slice(s), ${bytes(d.others.memoryLimit)} reserved`,
      }, h("span", {}, "others")));
    }
    const tenants = [...new Set(d.slices.map((s) => s.tenant))];
    const busy = Object.entries(d.shares).map(([t, share]) =>
      h("div", { class: "seg", style: `width:${100 * share}%;background:${colour(t)}`, title: `${t}: ${pct(share)} of device time` }, h("span", {}, t)));
    if (d.others && d.others.share > 0) {
      busy.push(h("div", { class: "seg others", style: `width:${100 * d.others.share}%`, title: `other tenants: ${pct(d.others.share)}` }));
    }
    return h("div", { class: "card", "data-device": d.id },
      h("div", { class: "card-head" },
        h("span", { class: "name" }, d.id), h("span", { class: "muted" }, d.model),
        h("span", { class: "badge " + (d.healthy ? "ok" : "Failed") }, d.healthy ? "healthy" : "unhealthy"),
        d.throttle.length ? h("span", { class: "badge waiting" }, "throttled: " + d.throttle.join(", ")) : null),
      h("div", { class: "stats" },
        h("span", {}, "utilisation ", h("b", {}, pct(d.utilization))),
        h("span", {}, "memory ", h("b", {}, bytes(d.memoryUsed)), " used · ", h("b", {}, bytes(d.memoryReserved)),
          " reserved of ", h("b", {}, bytes(d.memoryTotal))),
        d.temperature !== null ? h("span", {}, "temp ", h("b", {}, d.temperature.toFixed(0) + " °C")) : null,
        d.power !== null ? h("span", {}, "power ", h("b", {}, d.power.toFixed(0) + " W")) : null),
      h("div", { class: "muted small" }, "memory caps by slice (dark: in use)"),
      h("div", { class: "bar memory" }, segments),
      h("div", { class: "muted small" }, `device time, last window: ${pct(d.busy)} busy`),
      h("div", { class: "bar busy" }, busy),
      h("div", { class: "legend" }, tenants.map((t) => h("span", {}, h("i", { style: `background:${colour(t)}` }), t))));
  }));
}

function renderTenants(tenants) {
  if (!tenants.length) {
    $("tenants").replaceChildren(h("p", { class: "empty" }, "No tenants yet."));
    return;
  }
  $("tenants").replaceChildren(...tenants.map((t) => {
    const rejected = Object.values(t.rejections).reduce((a, b) => a + b, 0);
    const stateText = t.state === "starving" ? "starving" : t.state === "waiting" ? "waiting" : "ok";
    return h("div", { class: "card", "data-tenant": t.name },
      h("div", { class: "card-head" },
        h("span", { class: "tenant-dot", style: `background:${colour(t.name)}` }),
        h("span", { class: "name" }, t.name), h("span", { class: "muted" }, `weight ${t.weight}`),
        h("span", { class: "badge " + t.state }, stateText)),
      t.devices.map((e) => h("div", { class: "share", "data-share-device": e.device },
        h("div", { class: "stats" },
          h("span", {}, e.device, ": ", h("b", { "data-field": "share" }, pct(e.share)), " of device time"),
          h("span", {}, "guaranteed ", h("b", {}, pct(e.entitlement))),
          h("span", {}, "queued ", h("b", {}, e.queued))),
        h("div", { class: "bar thin" },
          h("div", { class: "fill", style: `width:${Math.min(100, 100 * e.share)}%;background:${colour(t.name)}` }),
          e.entitlement > 0 ? h("div", { class: "mark", style: `left:${Math.min(99.5, 100 * e.entitlement)}%`, title: "guaranteed share" }) : null))),
      h("div", { class: "stats" },
        h("span", {}, "p99 queue wait ", h("b", {}, ms(t.waitP99))),
        h("span", {}, "refused (last minute) ", h("b", {}, rejected))));
  }));
}

function renderDeployments(deployments) {
  $("no-deployments").hidden = deployments.length > 0;
  $("deployments").hidden = deployments.length === 0;
  $("deployments").tBodies[0].replaceChildren(...deployments.map((d) =>
    h("tr", { "data-deployment": `${d.tenant}/${d.name}` },
      h("td", {}, h("span", { class: "tenant-dot", style: `background:${colour(d.tenant)}` }), d.tenant),
      h("td", {}, h("b", {}, d.name), h("div", { class: "muted small" }, d.model)),
      h("td", {}, h("span", { class: "badge " + d.state, "data-field": "state" }, d.state)),
      h("td", {}, d.latencyClass || "–"),
      h("td", { class: "num" }, `${d.ready}/${d.replicas}`),
      h("td", { class: "num", "data-field": "p50" }, ms(d.p50)),
      h("td", { class: "num", "data-field": "p99" }, ms(d.p99)),
      h("td", { class: "num", "data-field": "rate" }, d.rate.toFixed(d.rate < 10 ? 1 : 0)),
      h("td", { class: "num", "data-field": "queued" }, d.queued),
      h("td", { class: "num", "data-field": "ok" }, d.requests.ok.toFixed(0)),
      h("td", { class: "num", "data-field": "refused" }, d.requests.refused.toFixed(0)),
      h("td", { class: "num", "data-field": "failed" }, d.requests.failed.toFixed(0)),
      h("td", { class: "num" }, d.restarts),
      h("td", { class: "reason" }, d.reason))));
}

function renderPending(pending) {
  $("no-pending").hidden = pending.length > 0;
  $("pending").hidden = pending.length === 0;
  $("pending").tBodies[0].replaceChildren(...pending.map((p) =>
    h("tr", { "data-slice": p.slice },
      h("td", {}, p.slice),
      h("td", {}, h("span", { class: "badge " + p.state }, p.state)),
      h("td", {}, ago(p.since)),
      h("td", { class: "reason" }, p.reason || "–"))));
}

// "updated 0s ago" ticks on its own, so a stalled node is visible at a glance.
setInterval(() => {
  if (!lastOk || $("dashboard").hidden) return;
  $("freshness").textContent = `updated ${((Date.now() - lastOk) / 1000).toFixed(0)}s ago`;
}, 500);

$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  if (key) signIn(key);
});
$("sign-out").addEventListener("click", () => signOut());

const saved = sessionStorage.getItem(KEY_STORAGE);
if (saved) signIn(saved);
else show("signed-out");
