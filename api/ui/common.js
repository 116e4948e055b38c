// Shared by the dashboard's pages: the API client (bearer token from sessionStorage), the token
// prompt, DOM building without innerHTML (every value from the API is text, never markup), and
// formatting. Hand-written, no framework, nothing fetched from elsewhere.

const TOKEN_KEY = "tsptq-token";

export class AuthNeeded extends Error {}

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
    this.detail = detail;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// The server compares the header's raw bytes with the token's UTF-8 bytes; fetch() sends a
// header value's characters as latin-1 bytes, so each UTF-8 byte becomes one character.
function headerValue(t) {
  return "Bearer " + String.fromCharCode(...new TextEncoder().encode(t));
}

export function authHeaders() {
  const t = token();
  return t ? { Authorization: headerValue(t) } : {};
}

// fetch() against the API: the token in the Authorization header (never in a URL or a
// cookie); AuthNeeded on 401, ApiError (with the API's detail) on any other error status.
export async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), ...authHeaders() };
  const r = await fetch(path, { ...options, headers, cache: "no-store" });
  if (r.status === 401) throw new AuthNeeded(token() ? "wrong token" : "token needed");
  if (!r.ok) {
    let detail = `HTTP ${r.status}`;
    try { detail = (await r.json()).detail ?? detail; } catch { /* not JSON */ }
    throw new ApiError(r.status, detail);
  }
  return r;
}

export async function apiJson(path, options) {
  return (await api(path, options)).json();
}

// An artifact as an object URL, fetched with the token (an <img src> or <a href> could not
// send the header).
export async function blobUrl(url) {
  return URL.createObjectURL(await (await api(url)).blob());
}

// h("td", {class: "x"}, "text", child): an element; strings become text nodes.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const $ = (sel) => document.querySelector(sel);

// The page's guard: shows the token form (and nothing about jobs) until the API accepts the
// request ``probe``; then calls ``start``. A wrong token is dropped and asked for again.
export async function guard(probe, start) {
  const auth = $("#auth"), content = $("#content"), form = $("#token-form");
  const signout = $("#signout");
  signout.addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token-input").value);
    location.reload();
  });
  try {
    await api(probe);
  } catch (e) {
    if (e instanceof AuthNeeded) {
      if (token()) {
        sessionStorage.removeItem(TOKEN_KEY);
        $("#token-error").textContent = "The server refused that token; try again.";
      }
      content.hidden = true;
      auth.hidden = false;
      $("#token-input").focus();
      return;
    }
    if (!(e instanceof ApiError)) throw e;  // the page shows ApiErrors itself
  }
  auth.hidden = true;
  content.hidden = false;
  signout.hidden = !token();
  await start();
}

// -- formatting ---------------------------------------------------------------------------

// SQLite gives the API naive UTC datetimes: read a time without a zone as UTC.
export function parseTime(s) {
  if (!s) return null;
  return new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(s) ? s : s + "Z");
}

export function duration(seconds) {
  if (!isFinite(seconds)) return "?";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

export function age(s) {
  const t = parseTime(s);
  return t ? `${duration((Date.now() - t.getTime()) / 1000)} ago` : "";
}

export function pct(x, digits = 2) {
  return typeof x === "number" ? `${(x * 100).toFixed(digits)}%` : "–";
}

export function num(x, digits = 4) {
  if (typeof x !== "number") return "–";
  return Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(2) : x.toFixed(digits);
}

export function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0, v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${units[i]}`;
}

export function quantLabel(req) {
  const q = (req && req.quant) || {};
  return `${q.method || "?"} W${q.w_bits ?? "?"}A${q.a_bits ?? "?"} ${q.setting || ""}`.trim();
}

export const ACTIVE = new Set(["queued", "running"]);

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, "data-status": status }, status);
}

export function progressBar(job) {
  const { done, total } = job.progress;
  const finished = job.status === "succeeded";
  const frac = finished ? 1 : total > 0 ? Math.min(1, done / total) : 0;
  const fill = h("div", { class: "fill" });
  fill.style.width = `${(frac * 100).toFixed(1)}%`;  // CSSOM: the CSP refuses style attributes
  return h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
                    "aria-valuenow": Math.round(frac * 100) }, fill);
}

// The result in one line: top-1 and its drop from FP32, or, for a text encoder, the embeddings'
// cosine and nearest-neighbour agreement.
export function resultLine(result) {
  if (!result) return "";
  if (typeof result.cosine === "number") {
    return `cos ${result.cosine.toFixed(4)} · NN ${pct(result.nn_agreement, 1)}`;
  }
  if (typeof result.top1 === "number" && typeof result.fp32_top1 === "number") {
    const drop = (result.fp32_top1 - result.top1) * 100;
    return `${pct(result.top1)} (${drop > 0 ? "−" : "+"}${Math.abs(drop).toFixed(2)} pts)`;
  }
  return typeof result.top1 === "number" ? pct(result.top1) : "";
}
