// The Pareto front as an SVG scatter chart, drawn here (no chart library): every candidate a
// small dot, the front's candidates larger points joined by a step line, the chosen one ringed.
// Hovering a point shows its weight and activation bits, KL and agreement.
import { num, pct } from "./common.js";

const NS = "http://www.w3.org/2000/svg";
const W = 720, H = 340, M = { l: 72, r: 24, t: 18, b: 48 };

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

export const cost = (p) => (p.weight_bits + p.activation_bits) / 2;

// search.strategies.pareto_front: not dominated in (mean bits, KL), cheapest first.
export function paretoFront(points) {
  const sorted = points.map((p, i) => [p, i])
    .sort(([a, i], [b, j]) => cost(a) - cost(b) || a.kl - b.kl || i - j).map(([p]) => p);
  const front = [];
  for (const p of sorted) if (!front.length || p.kl < front[front.length - 1].kl) front.push(p);
  return front;
}

function ticks(lo, hi, n = 5) {
  const step = (hi - lo) / n;
  return Array.from({ length: n + 1 }, (_, i) => lo + i * step);
}

function describe(p) {
  return `W ${p.weight_bits.toFixed(2)} bits · A ${p.activation_bits.toFixed(2)} bits · ` +
    `KL ${num(p.kl, 5)} · agreement ${pct(p.agreement, 1)}` + (p.chosen ? " · chosen" : "");
}

export function drawPareto(svg, tooltip, points, chosenKey) {
  svg.replaceChildren();
  if (!points.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" },
      "no candidate scored yet"));
    return [];
  }
  const front = paretoFront(points);
  const onFront = new Set(front.map((p) => p.key));
  const xs = points.map(cost), ys = points.map((p) => p.kl);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  if (x1 - x0 < 0.5) { x0 -= 0.5; x1 += 0.5; }
  const pad = (x1 - x0) * 0.05;
  x0 -= pad; x1 += pad;
  const y0 = 0, y1 = Math.max(...ys) * 1.1 || 1;
  const X = (v) => M.l + ((v - x0) / (x1 - x0)) * (W - M.l - M.r);
  const Y = (v) => H - M.b - ((v - y0) / (y1 - y0)) * (H - M.t - M.b);

  const axes = s("g", { class: "axes" });
  axes.append(s("line", { x1: M.l, y1: H - M.b, x2: W - M.r, y2: H - M.b }),
    s("line", { x1: M.l, y1: M.t, x2: M.l, y2: H - M.b }));
  for (const t of ticks(x0, x1)) {
    axes.append(s("line", { x1: X(t), y1: H - M.b, x2: X(t), y2: H - M.b + 5 }),
      s("text", { x: X(t), y: H - M.b + 18, "text-anchor": "middle" }, t.toFixed(2)));
  }
  for (const t of ticks(y0, y1)) {
    axes.append(s("line", { x1: M.l - 5, y1: Y(t), x2: M.l, y2: Y(t) }),
      s("line", { x1: M.l, y1: Y(t), x2: W - M.r, y2: Y(t), class: "grid" }),
      s("text", { x: M.l - 8, y: Y(t) + 4, "text-anchor": "end" }, num(t, 4)));
  }
  axes.append(s("text", { x: (M.l + W - M.r) / 2, y: H - 8, "text-anchor": "middle", class: "label" },
    "mean bits, (weights + activations) / 2"),
  s("text", { x: 16, y: (M.t + H - M.b) / 2, "text-anchor": "middle", class: "label",
              transform: `rotate(-90 16 ${(M.t + H - M.b) / 2})` }, "KL(FP32 ‖ quantized)"));
  svg.append(axes);

  const wrap = svg.parentElement;
  const show = (p, el) => {
    tooltip.textContent = describe(p);
    tooltip.hidden = false;
    const box = el.getBoundingClientRect(), outer = wrap.getBoundingClientRect();
    tooltip.style.left = `${box.left - outer.left + 14}px`;
    tooltip.style.top = `${box.top - outer.top - 10}px`;
  };
  const dot = (p, r, cls) => {
    const chosen = p.key === chosenKey;
    const pt = { ...p, chosen };
    const c = s("circle", { cx: X(cost(p)), cy: Y(p.kl), r, class: chosen ? `${cls} chosen` : cls,
      "data-key": p.key, tabindex: 0 });
    c.append(s("title", {}, describe(pt)));
    c.addEventListener("mouseenter", () => show(pt, c));
    c.addEventListener("focus", () => show(pt, c));
    c.addEventListener("mouseleave", () => { tooltip.hidden = true; });
    c.addEventListener("blur", () => { tooltip.hidden = true; });
    return c;
  };
  const cloud = s("g", { class: "cloud" });
  for (const p of points) if (!onFront.has(p.key)) cloud.append(dot(p, 3, "cand-point"));
  svg.append(cloud);
  let d = "";
  front.forEach((p, i) => {
    d += i === 0 ? `M${X(cost(p))},${Y(p.kl)}` : `H${X(cost(p))}V${Y(p.kl)}`;
  });
  svg.append(s("path", { d, class: "front-line" }));
  const g = s("g", { class: "front" });
  const chosen = points.find((p) => p.key === chosenKey);
  if (chosen) g.append(s("circle", { cx: X(cost(chosen)), cy: Y(chosen.kl), r: 11, class: "chosen-ring" }));
  for (const p of front) g.append(dot(p, 6, "front-point"));
  svg.append(g);
  return front;
}
