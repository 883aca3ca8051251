/* The FedGen round server's dashboard. Plain JS: no framework, no build step, no external URL.
 *
 * Everything shown comes from the server, polled every 2 s: GET jobs (the jobs list), GET jobs/{id}/dashboard
 * (the job page: one aggregate the server computes from its database) and GET health. The page keeps no state
 * of its own beyond the last answer. Text from the server (client ids, reasons, device facts) is inserted with
 * textContent or as SVG text nodes only, never as HTML. Job control (pause / resume / cancel) sends the admin
 * token kept in sessionStorage (this tab only); without it the page is read-only.
 *
 * Hooks for tests: body[data-state] ("loading", "ready", "error"), body[data-view] ("jobs", "job"),
 * #round-counter[data-round] (the current round index, -1 before the first round), svg[data-points] (points
 * drawn per chart), #heatmap[data-cells], #updated[data-updates] (successful refreshes).
 */
(function () {
  "use strict";

  const POLL_MS = 2000;
  const REQUEST_TIMEOUT_MS = 8000;
  const TOKEN_KEY = "fedgen.adminToken";
  const ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
  const SVG_NS = "http://www.w3.org/2000/svg"; // a namespace name, never fetched
  const HEATMAP_MAX_ROWS = 300;
  const CONTROL_TRIES = 5; // a job control answered 503 (database busy) is sent again, this many times at most
  const CONTROL_RETRY_MS = 700;
  const CONTROL_ALLOWED = {
    pause: ["created", "running"],
    resume: ["paused"],
    cancel: ["created", "running", "paused"],
  };

  const $ = (id) => document.getElementById(id);
  let generation = 0; // bumped on every route change or forced refresh: a stale answer is not rendered
  let timer = null;
  let currentJobId = null; // the job of the job view (from the URL), null on the jobs list
  let lastJob = null; // the job of the last dashboard answer (for the controls)
  let deadlineAt = null; // performance.now() at which the open round's deadline passes

  // ------------------------------------------------------------------------------------------ DOM helpers
  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function cell(text, cls) {
    return el("td", text === undefined || text === null || text === "" ? "–" : text, cls);
  }

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function badge(text) {
    const node = el("span", text === null || text === undefined ? "–" : text, "badge");
    if (typeof text === "string" && /^[a-z]+$/.test(text)) node.classList.add(text);
    return node;
  }

  function setText(id, text) {
    $(id).textContent = text === undefined || text === null ? "–" : String(text);
  }

  // ------------------------------------------------------------------------------------------ formatting
  function fmtNumber(value, digits) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
  }

  function fmtBytes(value) {
    if (typeof value !== "number" || !Number.isFinite(value)) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let v = value;
    let unit = 0;
    while (Math.abs(v) >= 1000 && unit < units.length - 1) { v /= 1000; unit += 1; }
    return (unit === 0 ? String(Math.round(v)) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[unit];
  }

  function fmtDuration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
  }

  function fmtTime(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? "–" : date.toLocaleString();
  }

  function ageOf(iso, nowIso) {
    const age = (new Date(nowIso).getTime() - new Date(iso).getTime()) / 1000;
    return Number.isFinite(age) ? fmtDuration(age) + " ago" : "–";
  }

  // ------------------------------------------------------------------------------------------ server
  function token() {
    try { return window.sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  async function request(path, options) {
    const controller = new AbortController();
    const timeout = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    try {
      const response = await fetch(path, Object.assign({ cache: "no-store", signal: controller.signal,
        credentials: "same-origin", redirect: "error" }, options || {}));
      let body = null;
      try { body = await response.json(); } catch (e) { body = null; }
      return { ok: response.ok, status: response.status, body: body };
    } finally {
      clearTimeout(timeout);
    }
  }

  async function getJson(path, options) {
    const answer = await request(path, options);
    if (!answer.ok) {
      const error = answer.body && answer.body.error;
      const err = new Error(error ? error.code + ": " + error.message : "HTTP " + answer.status);
      err.status = answer.status;
      throw err;
    }
    return answer.body;
  }

  // ------------------------------------------------------------------------------------------ polling
  function parseRoute() {
    const match = /^#\/jobs\/([^/?#]+)$/.exec(window.location.hash);
    if (!match) return { jobId: null, invalid: false };
    let id = null;
    try { id = decodeURIComponent(match[1]); } catch (e) { id = null; }
    return ID_RE.test(id || "") ? { jobId: id, invalid: false } : { jobId: null, invalid: true };
  }

  function route() {
    const parsed = parseRoute();
    currentJobId = parsed.jobId;
    lastJob = null;
    deadlineAt = null;
    document.body.dataset.view = currentJobId ? "job" : "jobs";
    document.body.dataset.state = "loading";
    $("view-jobs").hidden = Boolean(currentJobId);
    $("view-job").hidden = !currentJobId;
    setText("control-msg", "");
    refreshNow(parsed.invalid ? "not a job id: showing the jobs list" : null);
  }

  function refreshNow(notice) {
    generation += 1;
    clearTimeout(timer);
    poll(generation, notice || null);
  }

  async function poll(gen, notice) {
    try {
      const [data, health] = await Promise.all([
        currentJobId ? getJson("jobs/" + encodeURIComponent(currentJobId) + "/dashboard") : getJson("jobs?limit=100"),
        request("health").catch(() => null),
      ]);
      if (gen !== generation) return;
      if (currentJobId) renderJob(data); else renderJobs(data);
      renderHealth(health);
      showError(notice);
      markUpdated();
    } catch (err) {
      if (gen !== generation) return;
      document.body.dataset.state = "error";
      showError(err.status ? err.message : "cannot reach the server (" + err.message + "); retrying");
    } finally {
      if (gen === generation) timer = setTimeout(() => poll(gen, notice), POLL_MS);
    }
  }

  function showError(text) {
    $("error").hidden = !text;
    $("error").textContent = text || "";
  }

  function markUpdated() {
    const updated = $("updated");
    updated.dataset.updates = String(Number(updated.dataset.updates || "0") + 1);
    updated.textContent = new Date().toLocaleTimeString();
    document.body.dataset.state = "ready";
  }

  function renderHealth(answer) {
    const node = $("health");
    node.className = "health";
    if (!answer || !answer.body || typeof answer.body.status !== "string") {
      node.textContent = "health unknown";
      return;
    }
    const h = answer.body;
    node.classList.add(h.status === "ok" ? "ok" : "degraded");
    node.textContent = "database " + h.database + " · broker " + h.broker;
  }

  // ------------------------------------------------------------------------------------------ jobs list
  function jobLink(id) {
    const link = el("a", id);
    link.href = "#/jobs/" + encodeURIComponent(id);
    return link;
  }

  function renderJobs(page) {
    const rows = page.items.map((job) => {
      const cfg = job.config || {};
      const alg = cfg.algorithm || {};
      const tr = document.createElement("tr");
      const idCell = document.createElement("td");
      idCell.appendChild(jobLink(job.id));
      const statusCell = document.createElement("td");
      statusCell.appendChild(badge(job.status));
      tr.append(idCell, statusCell, cell(job.current_round + " / " + cfg.rounds, "num"),
        cell((alg.algorithm || "") + (alg.partial ? " (partial)" : "")), cell(alg.model), cell(cfg.dataset),
        cell(cfg.active, "num"), cell(job.latest_model_version, "num"), cell(fmtTime(job.created_at)),
        cell(job.waiting_for_devices));
      return tr;
    });
    $("jobs-body").replaceChildren(...rows);
    $("jobs-empty").hidden = page.items.length > 0;
    $("jobs-more").hidden = page.total <= page.items.length;
    $("jobs-more").textContent = "Showing the newest " + page.items.length + " of " + page.total + " jobs.";
  }

  // ------------------------------------------------------------------------------------------ job page
  function renderJob(d) {
    lastJob = d.job;
    renderJobHead(d.job);
    renderProgress(d.current, d.job);
    renderRejections(d.current);
    renderCharts(d.rounds);
    renderClients(d.clients, d.clients_total, d.now);
    heatmap($("heatmap"), d.clients, d.num_classes || 0);
  }

  function renderJobHead(job) {
    const cfg = job.config || {};
    const alg = cfg.algorithm || {};
    document.title = job.id + " · FedGen round server";
    setText("job-title", job.id);
    const status = $("job-status");
    status.replaceWith(Object.assign(badge(job.status), { id: "job-status" }));
    setText("job-summary", [(alg.algorithm || "?") + (alg.partial ? " (partial)" : ""), alg.model, cfg.dataset,
      cfg.active + " clients per round", "quorum " + cfg.min_clients, cfg.aggregation,
      "model version " + (job.latest_model_version === null ? "–" : job.latest_model_version)].join(" · "));
    $("job-waiting").hidden = !job.waiting_for_devices;
    $("job-waiting").textContent = job.waiting_for_devices ? "waiting for devices: " + job.waiting_for_devices : "";
    $("job-error").hidden = !job.error;
    $("job-error").textContent = job.error || "";
    updateControls();
  }

  function renderProgress(current, job) {
    const counter = $("round-counter");
    counter.dataset.round = String(current ? current.index : -1);
    counter.textContent = current ? String(current.index) : "–";
    setText("round-done", job.current_round);
    setText("round-total", job.config ? job.config.rounds : null);
    setText("round-attempt", current ? "attempt " + current.attempt : "no round yet");
    const status = $("round-status");
    status.replaceWith(Object.assign(badge(current ? current.status : null), { id: "round-status" }));
    for (const name of ["selected", "received", "accepted", "rejected"]) {
      setText("count-" + name, current ? current[name] : null);
    }
    const share = current && current.selected > 0 ? Math.min(1, current.accepted / current.selected) : 0;
    $("round-bar").style.width = (100 * share).toFixed(1) + "%";
    if (current && typeof current.seconds_to_deadline === "number") {
      deadlineAt = performance.now() + 1000 * current.seconds_to_deadline;
    } else {
      deadlineAt = null;
      setText("round-deadline", !current ? "–"
        : current.closed_at ? current.status + " at " + fmtTime(current.closed_at)
          + (current.failure_reason ? " (" + current.failure_reason + ")" : "")
          : current.status);
    }
    tickDeadline();
  }

  function tickDeadline() {
    if (deadlineAt === null) return;
    const left = (deadlineAt - performance.now()) / 1000;
    setText("round-deadline", left > 0 ? "in " + fmtDuration(left) : "passed, closing");
  }

  function renderRejections(current) {
    const entries = Object.entries(current ? current.rejections : {}).sort((a, b) => b[1] - a[1]);
    $("rejections-body").replaceChildren(...entries.map(([reason, count]) => {
      const tr = document.createElement("tr");
      tr.append(cell(reason, "wrap"), cell(count, "num"));
      return tr;
    }));
    $("rejections-none").hidden = entries.length > 0;
  }

  // ------------------------------------------------------------------------------------------ controls
  function updateControls() {
    const hasToken = Boolean(token());
    for (const button of document.querySelectorAll("button.control")) {
      const allowed = Boolean(lastJob) && CONTROL_ALLOWED[button.dataset.action].includes(lastJob.status);
      button.disabled = !hasToken || !allowed;
      button.title = !hasToken ? "enter the admin token to control the job"
        : allowed ? "" : "not possible while the job is " + (lastJob ? lastJob.status : "loading");
    }
    $("token-state").textContent = hasToken ? "token set (this tab only)" : "read-only";
  }

  async function control(action) {
    const job = lastJob;
    const secret = token();
    if (!job || !secret || !CONTROL_ALLOWED[action]) return;
    if (action === "cancel" && !window.confirm("Cancel job " + job.id + "? This cannot be undone.")) return;
    setText("control-msg", action + "…");
    try {
      const answer = await postControl(job.id, action, secret);
      setText("control-msg", action + ": the job is now " + answer.status);
    } catch (err) {
      setText("control-msg", err.status === 401 ? action + " refused: the server did not accept the token"
        : action + " failed: " + err.message);
    }
    refreshNow(null);
  }

  /** POST jobs/{id}/{action}; a 503 (the database busy: "retry later") is retried a few times. */
  async function postControl(jobId, action, secret) {
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await getJson("jobs/" + encodeURIComponent(jobId) + "/" + action,
          { method: "POST", headers: { Authorization: "Bearer " + secret } });
      } catch (err) {
        if (err.status !== 503 || attempt >= CONTROL_TRIES) throw err;
        setText("control-msg", action + ": the server is busy, trying again…");
        await new Promise((resolve) => setTimeout(resolve, CONTROL_RETRY_MS));
      }
    }
  }

  function setupToken() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token-input").value.trim();
      $("token-input").value = "";
      try {
        if (value) window.sessionStorage.setItem(TOKEN_KEY, value);
      } catch (e) {
        setText("control-msg", "this browser does not allow session storage: job control is unavailable");
      }
      updateControls();
    });
    $("token-clear").addEventListener("click", () => {
      try { window.sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* nothing stored */ }
      updateControls();
    });
    for (const button of document.querySelectorAll("button.control")) {
      button.addEventListener("click", () => control(button.dataset.action));
    }
    updateControls();
  }

  // ------------------------------------------------------------------------------------------ charts
  const W = 480;
  const H = 220;
  const MARGIN = { left: 56, right: 14, top: 12, bottom: 30 };

  function niceStep(span, count) {
    const raw = span / count;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / power;
    return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * power;
  }

  function ticks(lo, hi, count, integer) {
    let step = niceStep(hi - lo || 1, count);
    if (integer) step = Math.max(1, Math.round(step));
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }

  function extent(values, fixed) {
    let lo = fixed && fixed.min !== undefined ? fixed.min : Math.min(...values);
    let hi = fixed && fixed.max !== undefined ? fixed.max : Math.max(...values);
    if (fixed && fixed.zero) { lo = Math.min(lo, 0); hi = Math.max(hi, 0); }
    if (hi - lo < 1e-12) { hi = lo + (Math.abs(lo) || 1); }
    return [lo, hi];
  }

  /** A line chart of `series` ([{label, points: [[round, value], ...]}]) into the SVG `node`. */
  function lineChart(node, series, opts) {
    const M = Object.assign({}, MARGIN, series.length > 1 ? { top: 28 } : {}); // room for the legend
    node.replaceChildren();
    const all = series.flatMap((s) => s.points);
    node.dataset.points = String(Math.max(0, ...series.map((s) => s.points.length)));
    if (all.length === 0) {
      node.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
      return;
    }
    const x0 = Math.min(...all.map((p) => p[0]));
    const x1 = Math.max(x0 + 1, ...all.map((p) => p[0]));
    const [y0raw, y1raw] = extent(all.map((p) => p[1]), opts.y);
    const yt = ticks(y0raw, y1raw, 5, false);
    const y0 = Math.min(y0raw, yt[0]);
    const y1 = Math.max(y1raw, yt[yt.length - 1]);
    const sx = (x) => M.left + (W - M.left - M.right) * (x - x0) / (x1 - x0 || 1);
    const sy = (y) => H - M.bottom - (H - M.top - M.bottom) * (y - y0) / (y1 - y0 || 1);
    for (const v of yt) {
      node.appendChild(svgEl("line", { x1: M.left, x2: W - M.right, y1: sy(v), y2: sy(v), class: "gridline" }));
      node.appendChild(svgEl("text", { x: M.left - 6, y: sy(v) + 4, "text-anchor": "end" }, opts.format(v)));
    }
    for (const v of ticks(x0, x1, 6, true)) {
      node.appendChild(svgEl("text", { x: sx(v), y: H - M.bottom + 16, "text-anchor": "middle" }, String(v)));
    }
    node.appendChild(svgEl("line", { x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom, class: "axis" }));
    node.appendChild(svgEl("line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, class: "axis" }));
    node.appendChild(svgEl("text", { x: W - M.right, y: H - 2, "text-anchor": "end" }, "round"));
    series.forEach((s, k) => drawSeries(node, s, k, sx, sy, opts.format));
    if (series.length > 1) legend(node, series, M);
  }

  function drawSeries(node, s, k, sx, sy, format) {
    if (s.points.length === 0) return;
    const d = s.points.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
    node.appendChild(svgEl("path", { d: d, class: "series s" + k }));
    const marks = s.points.length <= 60 ? s.points : [s.points[s.points.length - 1]];
    for (const p of marks) {
      const dot = svgEl("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.5, class: "s" + k });
      dot.appendChild(svgEl("title", {}, s.label + ", round " + p[0] + ": " + format(p[1])));
      node.appendChild(dot);
    }
  }

  function legend(node, series, M) {
    let x = M.left;
    for (const [k, s] of series.entries()) {
      node.appendChild(svgEl("rect", { x: x, y: 4, width: 10, height: 10, class: "s" + k }));
      node.appendChild(svgEl("text", { x: x + 14, y: 13, class: "legend" }, s.label));
      x += 30 + 6.5 * s.label.length;
    }
  }

  function points(rounds, key) {
    return rounds.filter((r) => typeof r[key] === "number" && Number.isFinite(r[key])).map((r) => [r.index, r[key]]);
  }

  function renderCharts(rounds) {
    const closed = rounds.filter((r) => r.status === "closed");
    const pct = (v) => (100 * v).toFixed(0) + " %";
    const num = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2));
    lineChart($("chart-accuracy"), [{ label: "accuracy", points: points(closed, "accuracy") }],
      { y: { min: 0, max: 1 }, format: pct });
    lineChart($("chart-loss"), [{ label: "loss", points: points(closed, "loss") }], { y: { zero: true }, format: num });
    lineChart($("chart-bytes"), [{ label: "up (devices → server)", points: points(closed, "bytes_up") },
      { label: "down (server → devices)", points: points(closed, "bytes_down") }], { y: { zero: true }, format: fmtBytes });
    lineChart($("chart-generator"), [{ label: "generator loss", points: points(closed, "generator_loss") }],
      { y: {}, format: num });
  }

  // ------------------------------------------------------------------------------------------ clients
  function byClientId(a, b) {
    return a.client_id.localeCompare(b.client_id, undefined, { numeric: true });
  }

  function renderClients(clients, total, now) {
    const sorted = clients.slice().sort(byClientId);
    $("clients-body").replaceChildren(...sorted.map((c) => clientRow(c, now)));
    setText("clients-count", total > clients.length ? "(" + clients.length + " of " + total + ")" : "(" + total + ")");
  }

  function clientRow(c, now) {
    const tr = document.createElement("tr");
    tr.dataset.client = c.client_id;
    const statusCell = document.createElement("td");
    statusCell.appendChild(badge(c.status));
    const seen = cell(ageOf(c.last_seen, now));
    seen.title = fmtTime(c.last_seen);
    const roundCell = document.createElement("td");
    if (c.round_status) roundCell.appendChild(badge(c.round_status)); else roundCell.textContent = "–";
    const runtime = c.runtime ? c.runtime + (c.runtime_version ? " " + c.runtime_version : "") : null;
    tr.append(cell(c.client_id), statusCell, seen, cell(runtime), cell(c.model), cell(c.partition_index, "num"),
      cell(c.num_samples, "num"), cell(c.state_version, "num"), roundCell, rejectedCell(c));
    return tr;
  }

  function rejectedCell(c) {
    const td = el("td", null, "wrap");
    const entries = Object.entries(c.rejections || {}).sort((a, b) => b[1] - a[1]);
    td.appendChild(el("span", String(c.rejected), c.rejected ? "reason" : "muted"));
    for (const [reason, count] of entries) td.appendChild(el("span", reason + " ×" + count, "reason"));
    if (c.refused) td.appendChild(el("span", "refused the job: " + c.refused, "reason"));
    return td;
  }

  // ------------------------------------------------------------------------------------------ heatmap
  function heatColor(intensity) {
    const t = Math.max(0, Math.min(1, intensity));
    const mix = (from, to) => Math.round(from + (to - from) * t);
    return "rgb(" + mix(241, 30) + "," + mix(245, 64) + "," + mix(249, 175) + ")";
  }

  /** Rows: clients with label counts; columns: classes; colour: count / the client's largest count. */
  function heatmap(node, clients, numClasses) {
    node.replaceChildren();
    const rows = clients.filter((c) => Array.isArray(c.label_counts) && c.label_counts.length > 0)
      .sort(byClientId).slice(0, HEATMAP_MAX_ROWS);
    $("heatmap-none").hidden = rows.length > 0;
    node.dataset.cells = "0";
    if (rows.length === 0 || numClasses <= 0) { node.setAttribute("width", "0"); node.setAttribute("height", "0"); return; }
    const cw = 34, ch = 18, left = 120, top = 20;
    const width = left + numClasses * cw + 70;
    const height = top + rows.length * ch + 6;
    for (const [k, v] of [["viewBox", "0 0 " + width + " " + height], ["width", width], ["height", height]]) {
      node.setAttribute(k, String(v));
    }
    for (let j = 0; j < numClasses; j += 1) {
      node.appendChild(svgEl("text", { x: left + j * cw + cw / 2, y: top - 6, "text-anchor": "middle" }, String(j)));
    }
    node.appendChild(svgEl("text", { x: left + numClasses * cw + 8, y: top - 6 }, "samples"));
    let cells = 0;
    rows.forEach((c, i) => { cells += heatRow(node, c, numClasses, left, top + i * ch, cw, ch); });
    node.dataset.cells = String(cells);
  }

  function heatRow(node, c, numClasses, left, y, cw, ch) {
    const counts = c.label_counts;
    const max = Math.max(1, ...counts);
    const total = counts.reduce((a, b) => a + b, 0);
    const label = svgEl("text", { x: left - 8, y: y + ch - 5, "text-anchor": "end" },
      c.client_id.length > 18 ? c.client_id.slice(0, 17) + "…" : c.client_id);
    label.appendChild(svgEl("title", {}, c.client_id));
    node.appendChild(label);
    for (let j = 0; j < numClasses; j += 1) {
      const n = typeof counts[j] === "number" ? counts[j] : 0;
      const rect = svgEl("rect", { x: left + j * cw, y: y, width: cw - 2, height: ch - 2, fill: heatColor(n / max) });
      const share = total > 0 ? (100 * n / total).toFixed(1) : "0";
      rect.appendChild(svgEl("title", {}, c.client_id + " · class " + j + ": " + n + " samples (" + share + " %)"));
      node.appendChild(rect);
      if (n > 0) {
        node.appendChild(svgEl("text", { x: left + j * cw + cw / 2 - 1, y: y + ch - 5, "text-anchor": "middle",
          class: n / max > 0.55 ? "on-dark" : "on-light" }, n >= 10000 ? Math.round(n / 1000) + "k" : String(n)));
      }
    }
    node.appendChild(svgEl("text", { x: left + numClasses * cw + 8, y: y + ch - 5 }, String(total)));
    return numClasses;
  }

  // ------------------------------------------------------------------------------------------ start
  function start() {
    setupToken();
    window.addEventListener("hashchange", route);
    window.setInterval(tickDeadline, 1000);
    route();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
}());
