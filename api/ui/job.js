// One job: live stage, progress and ETA (GET /jobs/{id}, polled while it runs), the request,
// the result beside FP32, the Pareto front and the candidates (GET /jobs/{id}/candidates), the
// per-layer table (the report artifact's "layers"), the plots and the downloads
// (GET /jobs/{id}/artifacts), and a cancel button (DELETE /jobs/{id}).
import { drawPareto } from "./chart.js";
import {
  $, ACTIVE, ApiError, api, apiJson, AuthNeeded, blobUrl, bytes, duration, guard, h,
  num, parseTime, pct, progressBar, statusBadge, token,
} from "./common.js";

const JOB_ID = decodeURIComponent(location.pathname.split("/").pop());
const POLL_MS = 1000, CANDIDATES_MS = 3000;
let lastCandidates = 0, finishedLoaded = false, candidates = [], chosenKey = null;
let sort = { key: "seq", dir: 1 };

function onAuth(e) {
  if (e instanceof AuthNeeded) { location.reload(); return true; }
  return false;
}

// -- overview -------------------------------------------------------------------------------

function eta(job) {
  const { done, total } = job.progress;
  const started = parseTime(job.started_at);
  if (job.status !== "running" || !started || !(total > 0) || !(done > 0) || done >= total) return "";
  const elapsed = (Date.now() - started.getTime()) / 1000;
  return `ETA ≈ ${duration((elapsed / done) * (total - done))}`;
}

function renderOverview(job) {
  document.title = `tsptq · job ${job.id.slice(0, 8)}`;
  $("#job-id").textContent = job.id;
  $("#job-status").replaceChildren(statusBadge(job.status));
  $("#cancel").hidden = !ACTIVE.has(job.status) || job.cancel_requested;
  if (job.cancel_requested && job.status === "running") {
    $("#cancel-message").textContent = "cancellation requested";
  }
  $("#progress-bar").replaceChildren(progressBar(job));
  const { done, total, stage } = job.progress;
  $("#stage").textContent = job.status === "running" ? `stage: ${stage || "starting"}`
    : job.status === "queued" ? "waiting for a dispatcher" : "";
  $("#counts").textContent = total > 0 ? `${done}/${total} candidates` : "";
  $("#eta").textContent = eta(job);
  $("#job-error").textContent = job.error || "";
  const t = [`created ${parseTime(job.created_at).toLocaleString()}`];
  if (job.started_at) t.push(`started ${parseTime(job.started_at).toLocaleString()}`);
  if (job.finished_at) t.push(`finished ${parseTime(job.finished_at).toLocaleString()}`);
  if (job.timings && job.timings.total_s !== undefined) t.push(`took ${duration(job.timings.total_s)}`);
  $("#times").textContent = t.join(" · ");
  $("#request").textContent = JSON.stringify(job.request, null, 2);
  renderResult(job.result);
}

function renderResult(r) {
  const rows = [];
  const row = (name, q, fp) => rows.push(h("tr", {}, h("th", {}, name), h("td", {}, q), h("td", {}, fp)));
  if (r) {
    if (typeof r.cosine === "number") {
      row("cosine with FP32 (mean)", num(r.cosine, 4), "1");
      row("cosine (worst text)", num(r.min_cosine, 4), "1");
      row("nearest-neighbour agreement", pct(r.nn_agreement), "100%");
    } else {
      row("top-1", pct(r.top1), pct(r.fp32_top1));
      const drop = (r.fp32_top1 - r.top1) * 100;
      if (isFinite(drop)) row("drop from FP32", `${drop.toFixed(2)} pts`, "");
      row("agreement with FP32 top-1", pct(r.agreement), "100%");
      row("KL(FP32 ‖ quantized)", num(r.kl, 5), "0");
    }
    row("size", bytes(r.size_bytes), bytes(r.fp32_size_bytes));
    if (r.compression) row("compression", `${r.compression}×`, "1×");
    if (r.onnx && r.onnx.available !== false && typeof r.onnx.top1 === "number") {
      row(`ONNX Runtime top-1 (${r.onnx.form})`, pct(r.onnx.top1), "");
    }
    const c = r.search && r.search.costs;
    if (c) row("mean bits (W / A)", `${num(c.weight_bits, 2)} / ${num(c.activation_bits, 2)}`, "32 / 32");
    $("#result-note").textContent = (r.search && r.search.message) || "";
  } else {
    rows.push(h("tr", {}, h("td", { colspan: 3, class: "hint" }, "once the job has succeeded")));
  }
  $("#result tbody").replaceChildren(...rows);
}

// -- candidates -----------------------------------------------------------------------------

function points() {
  return candidates.map((c) => ({ seq: c.seq, key: c.key, kl: c.kl, agreement: c.agreement,
    weight_bits: c.costs.weight_bits, activation_bits: c.costs.activation_bits,
    weight_bytes: c.costs.weight_bytes, bitops: c.costs.bitops }));
}

function renderCandidates() {
  const pts = points();
  const front = drawPareto($("#pareto"), $("#tooltip"), pts, chosenKey);
  const onFront = new Set(front.map((p) => p.key));
  for (const p of pts) p.front = onFront.has(p.key) ? 1 : 0;
  const type = document.querySelector(`#candidates th[data-key="${sort.key}"]`).dataset.type;
  pts.sort((a, b) => {
    const x = a[sort.key], y = b[sort.key];
    return sort.dir * (type === "num" ? x - y : String(x).localeCompare(String(y))) || a.seq - b.seq;
  });
  for (const th of document.querySelectorAll("#candidates th")) {
    th.setAttribute("aria-sort", th.dataset.key === sort.key ? (sort.dir > 0 ? "ascending" : "descending") : "none");
  }
  $("#candidates tbody").replaceChildren(...pts.map((p) => h("tr", {
    "data-key": p.key, class: [p.front ? "on-front" : "", p.key === chosenKey ? "chosen" : ""].join(" ").trim() || null },
  h("td", {}, p.seq), h("td", { class: "mono" }, p.key), h("td", {}, num(p.weight_bits, 3)),
  h("td", {}, num(p.activation_bits, 3)), h("td", {}, p.weight_bytes), h("td", {}, num(p.bitops, 0)),
  h("td", {}, num(p.kl, 5)), h("td", {}, pct(p.agreement, 1)),
  h("td", {}, p.key === chosenKey ? "chosen" : p.front ? "✓" : ""))));
  $("#candidates-count").textContent = `${pts.length} scored, ${front.length} on the front`;
}

async function loadCandidates() {
  lastCandidates = Date.now();
  candidates = await apiJson(`/jobs/${JOB_ID}/candidates`);
  renderCandidates();
}

// -- after the job: report, plots, downloads ------------------------------------------------

function layerDetail(q) {
  if (q.split_threshold !== undefined) {
    return `τ = ${num(q.split_threshold, 4)}, shift ${q.shift}, ${q.fine_codes} fine codes`;
  }
  if (Array.isArray(q.outlier_channels)) {
    const n = q.outlier_channels.length;
    const shown = q.outlier_channels.slice(0, 8).join(", ");
    return `${n} outlier channel${n === 1 ? "" : "s"}${n ? `: ${shown}${n > 8 ? ", …" : ""}` : ""}` +
      (q.exponents ? ` (exponents ${q.exponents.join(", ")})` : "");
  }
  if (q.granularity === "channel") return `per channel (${q.channels})`;
  if (typeof q.scale === "number") return `scale ${num(q.scale, 5)}`;
  return "";
}

function renderLayers(layers) {
  const rows = Object.entries(layers || {}).map(([name, q]) => h("tr", { class: q.enabled === false ? "off" : null },
    h("td", { class: "mono" }, name), h("td", {}, q.kind ?? ""), h("td", {}, q.scheme ?? ""),
    h("td", {}, q.enabled === false ? "float" : q.bits ?? ""), h("td", {}, layerDetail(q))));
  $("#layers tbody").replaceChildren(...rows);
  $("#layers-note").textContent = `${rows.length} quantizers, from report.json`;
}

function downloadLink(a) {
  const link = h("a", { href: a.url, download: a.name.split("/").pop() }, a.name);
  if (token()) {  // a plain link could not send the bearer header: fetch it, then save the blob
    link.addEventListener("click", async (ev) => {
      ev.preventDefault();
      const url = await blobUrl(a.url);
      const tmp = h("a", { href: url, download: a.name.split("/").pop() });
      document.body.append(tmp);
      tmp.click();
      tmp.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    });
  }
  return link;
}

async function loadFinished(job) {
  finishedLoaded = true;
  const artifacts = await apiJson(`/jobs/${JOB_ID}/artifacts`);
  $("#downloads tbody").replaceChildren(...(artifacts.length ? artifacts.map((a) => h("tr", { "data-kind": a.kind },
    h("td", {}, downloadLink(a)), h("td", {}, a.kind), h("td", { title: `${a.size} bytes` }, bytes(a.size)),
    h("td", { class: "mono sha" }, a.sha256)))
    : [h("tr", {}, h("td", { colspan: 4, class: "hint" }, `no files: the job ${job.status}`))]));
  const plots = artifacts.filter((a) => a.media_type === "image/png");
  $("#plots").replaceChildren(...plots.map((a) => {
    const img = h("img", { alt: a.name, "data-name": a.name });
    if (token()) blobUrl(a.url).then((u) => { img.src = u; });
    else img.src = a.url;
    return h("figure", {}, img, h("figcaption", {}, a.name.replace(/^plots\//, "")));
  }));
  if (!plots.length) $("#plots").replaceChildren(h("p", { class: "hint" }, "no plots (artifacts.plots was false, or the job did not succeed)"));
  const report = artifacts.find((a) => a.kind === "report");
  if (report) renderLayers((await apiJson(report.url)).layers);
  else $("#layers-note").textContent = "no report: the job did not succeed";
}

// -- the loop -------------------------------------------------------------------------------

async function tick() {
  let job;
  try {
    job = await apiJson(`/jobs/${JOB_ID}`);
    $("#load-error").textContent = "";
  } catch (e) {
    if (onAuth(e)) return;
    $("#load-error").textContent = e instanceof ApiError ? e.message : `could not reach the service: ${e.message}`;
    if (!(e instanceof ApiError && e.status === 404)) setTimeout(tick, POLL_MS * 3);
    return;
  }
  chosenKey = (job.result && job.result.search && job.result.search.key) || null;
  renderOverview(job);
  const active = ACTIVE.has(job.status);
  try {
    if (!active || Date.now() - lastCandidates > CANDIDATES_MS) await loadCandidates();
    if (!active && !finishedLoaded) await loadFinished(job);
  } catch (e) {
    if (onAuth(e)) return;
    $("#load-error").textContent = e.message;
  }
  if (active) setTimeout(tick, POLL_MS);
}

async function cancel() {
  const button = $("#cancel");
  button.disabled = true;
  try {
    const r = await api(`/jobs/${JOB_ID}`, { method: "DELETE" });
    const job = await r.json();
    $("#cancel-message").textContent = r.status === 202 ? "cancellation requested" : `job ${job.status}`;
    renderOverview(job);
  } catch (e) {
    if (onAuth(e)) return;
    $("#cancel-message").textContent = e.message;
  } finally {
    button.disabled = false;
  }
}

guard(`/jobs/${encodeURIComponent(JOB_ID)}`, async () => {
  $("#cancel").addEventListener("click", cancel);
  for (const th of document.querySelectorAll("#candidates th")) {
    th.addEventListener("click", () => {
      sort = { key: th.dataset.key, dir: sort.key === th.dataset.key ? -sort.dir : 1 };
      renderCandidates();
    });
  }
  await tick();
});

