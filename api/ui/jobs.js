// The jobs list (GET /jobs, refreshed by itself while jobs run), the submit form (POST /jobs,
// the API's 4xx message shown beside the field it concerns) and the uploaded models (GET /models).
import {
  $, ACTIVE, ApiError, age, api, apiJson, AuthNeeded, bytes, guard, h, progressBar, quantLabel,
  resultLine, statusBadge,
} from "./common.js";

const FAST_MS = 2000, SLOW_MS = 10000;
const seen = new Map();  // job id -> the statuses this page has shown it in, in order
let timer = null;

function remember(job) {
  const s = seen.get(job.id) || [];
  if (s[s.length - 1] !== job.status) s.push(job.status);
  seen.set(job.id, s);
  return s;
}

function jobRow(job) {
  const req = job.request || {};
  const strategy = (req.search && req.search.strategy) || "none";
  const progress = job.progress.total > 0 ? `${job.progress.done}/${job.progress.total}` : "";
  return h("tr", { "data-job": job.id, "data-status": job.status, "data-seen": remember(job).join(" ") },
    h("td", {}, h("a", { href: `/ui/jobs/${job.id}`, class: "mono" }, job.id.slice(0, 8))),
    h("td", {}, statusBadge(job.status)),
    h("td", {}, req.model ?? ""),
    h("td", {}, quantLabel(req)),
    h("td", {}, strategy),
    h("td", { class: "progress" }, progressBar(job),
      h("span", { class: "hint" }, [job.status === "running" ? job.progress.stage : null, progress]
        .filter(Boolean).join(" "))),
    h("td", { title: job.created_at }, age(job.created_at)),
    h("td", { class: "result" }, job.status === "failed" ? h("span", { class: "error" }, "failed")
      : resultLine(job.result)));
}

async function refresh() {
  clearTimeout(timer);
  const status = $("#status-filter").value;
  const query = new URLSearchParams({ limit: "50" });
  if (status) query.set("status", status);
  let page;
  try {
    page = await apiJson(`/jobs?${query}`);
    $("#jobs-error").textContent = "";
  } catch (e) {
    if (e instanceof AuthNeeded) { location.reload(); return; }
    $("#jobs-error").textContent = `could not list jobs: ${e.message}`;
    timer = setTimeout(refresh, SLOW_MS);
    return;
  }
  $("#jobs-table tbody").replaceChildren(...page.items.map(jobRow));
  $("#jobs-count").textContent = `${page.items.length} of ${page.total}`;
  const active = page.items.some((j) => ACTIVE.has(j.status));
  timer = setTimeout(refresh, active ? FAST_MS : SLOW_MS);
}

async function loadUploads() {
  let models = [];
  try { models = await apiJson("/models?limit=100"); } catch (e) {
    $("#uploads-table tbody").replaceChildren(h("tr", {}, h("td", { colspan: 5, class: "error" }, e.message)));
    return;
  }
  const select = $("#weights");
  for (const m of models) select.append(h("option", { value: m.weights }, `${m.name} (${m.weights.slice(0, 14)}…)`));
  $("#uploads-table tbody").replaceChildren(...(models.length ? models.map((m) => h("tr", {},
    h("td", {}, m.name), h("td", {}, bytes(m.size)), h("td", { class: "mono" }, m.sha256.slice(0, 16) + "…"),
    h("td", {}, age(m.created_at)), h("td", { class: "mono" }, m.weights)))
    : [h("tr", {}, h("td", { colspan: 5, class: "hint" }, "none yet"))]));
}

// The request from the form: empty fields are left out (the API's defaults apply).
function requestOf(form) {
  const body = {};
  const put = (path, value) => {
    const keys = path.split(".");
    let o = body;
    for (const k of keys.slice(0, -1)) o = o[k] ??= {};
    o[keys[keys.length - 1]] = value;
  };
  for (const el of form.elements) {
    if (!el.name || el.name === "budget") continue;
    if (el.type === "checkbox") { put(el.name, el.checked); continue; }
    if (el.value === "") continue;
    put(el.name, el.type === "number" ? Number(el.value) : el.value);
  }
  const budget = form.elements.budget.value;
  if (budget !== "") {
    put("search.budget_weight_bits", Number(budget));
    put("search.budget_activation_bits", Number(budget));
  }
  return body;
}

// Where an error belongs: the span whose data-for names the issue's field path (body.quant.w_bits
// -> quant.w_bits), or its nearest parent (a model-level check on "search"); else the form's.
function errorSpan(path) {
  const spans = [...document.querySelectorAll("#job-form .field-error")];
  for (let p = path; p.length; p = p.slice(0, -1)) {
    const name = p.join(".");
    const span = spans.find((s) => s.dataset.for.split(" ").includes(name));
    if (span) return span;
  }
  return $("#form-error");
}

// A sentence (checks beyond the schema) names its field first ("weights: ...",
// "data.source: ..."); the only other one POST /jobs answers is about the model.
function sentencePath(detail) {
  const m = /^([a-z_.]+):/.exec(detail);
  if (m && m[1] !== "model") return m[1].split(".");
  return ["model"];
}

function showErrors(e) {
  if (!(e instanceof ApiError)) {
    $("#form-error").textContent = e.message;
    return;
  }
  const issues = Array.isArray(e.detail)
    ? e.detail.map((i) => ({ path: (i.loc || []).filter((p) => p !== "body").map(String), msg: i.msg }))
    : [{ path: e.status === 422 ? sentencePath(e.detail) : [], msg: e.detail }];
  for (const { path, msg } of issues) {
    const span = errorSpan(path);
    span.textContent = span.textContent ? `${span.textContent}; ${msg}` : msg;
    span.closest("label")?.classList.add("invalid");
  }
}

async function submit(ev) {
  ev.preventDefault();
  const form = ev.target;
  for (const s of form.querySelectorAll(".field-error")) s.textContent = "";
  for (const l of form.querySelectorAll(".invalid")) l.classList.remove("invalid");
  $("#submitted").replaceChildren();
  try {
    const r = await api("/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                   body: JSON.stringify(requestOf(form)) });
    const job = await r.json();
    $("#submitted").replaceChildren("submitted ",
      h("a", { href: `/ui/jobs/${job.id}`, class: "mono", id: "submitted-link" }, job.id.slice(0, 8)));
    const tbody = $("#jobs-table tbody");
    tbody.querySelector(`tr[data-job="${job.id}"]`)?.remove();
    tbody.prepend(jobRow(job));
    clearTimeout(timer);
    timer = setTimeout(refresh, FAST_MS);
  } catch (e) {
    if (e instanceof AuthNeeded) { location.reload(); return; }
    showErrors(e);
  }
}

guard("/jobs?limit=1", async () => {
  $("#job-form").addEventListener("submit", submit);
  $("#status-filter").addEventListener("change", refresh);
  await Promise.all([loadUploads(), refresh()]);
});
