"""The dashboard in a real browser: Playwright driving the system's Chromium (Debian's
``chromium`` package; ``.ci/run`` installs it) against a real ``tsptq serve`` on the embedded
default (SQLite in its data directory, a dispatcher, a local Ray).

Submitting through the form, the job seen queued and then succeeded on the jobs list, its page:
one chart point per Pareto-front candidate (the front computed here from the same candidates),
the chosen one marked, hover, sorting, the per-layer table, the plots, a download checked
against its sha256; a bad field shows the API's own message beside it; cancelling; and, on a
server with a token, the prompt that guards every page. Screenshots of the jobs list and a
finished job's page are written and checked.

Without Chromium (or Playwright) these tests are skipped, except under ``CI``, where they fail.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import httpx
import pytest
from procs import Proc, free_port, service_env, wait_for, wait_healthy

from search.strategies import pareto_front

pytestmark = pytest.mark.slow  # real servers and a browser

VIEWPORT = {"width": 1280, "height": 900}
TOKEN = "dash-tökén-42"
# A real search, small: ~12 candidates on the digits ViT, histograms on.
SMALL_DATA = {"calib_size": 8, "val_size": 32, "test_limit": 90}


def find_chromium() -> str | None:
    for candidate in (os.environ.get("TSPTQ_CHROMIUM"), "/usr/bin/chromium",
                      "/usr/bin/chromium-browser", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the browser tests must run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        _unavailable("no Chromium found (apt-get install chromium, or set TSPTQ_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (it is in the dev extra)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


class Served:
    def __init__(self, tmp: Path, token: str | None, api_only: bool) -> None:
        env = service_env(tmp, "unused", heartbeat_s=0.5, stale_after_s=30)
        del env["TSPTQ_DATABASE_URL"]  # the embedded default: SQLite in TSPTQ_DATA_DIR
        if token:
            env["TSPTQ_API_TOKEN"] = token
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = ["serve", "--port", str(port), "--log-level", "warning"]
        self.proc = Proc(args + (["--api-only"] if api_only else []), env, tmp / "serve.log")
        wait_healthy(self.url, self.proc)
        headers = {"Authorization": f"Bearer {token}".encode()} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def close(self) -> None:
        self.http.close()
        self.proc.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("dash"), None, api_only=False)
    yield s
    s.close()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("dash-token"), TOKEN, api_only=True)
    yield s
    s.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield page
    context.close()
    # No script error, no resource refused (CSP) or missing; a 422 is the API's answer to a
    # bad form, which the page shows (the browser logs it all the same).
    assert [e for e in errors if "status of 422" not in e] == [], errors


def check_png(path: Path, width: int, min_height: int) -> None:
    """A real screenshot: a PNG of the expected size that is not one flat colour."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, (path, len(data))
    image = Image.open(io.BytesIO(data))
    assert image.width == width and image.height >= min_height, image.size
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "a nearly blank screenshot"


def fill_form(page, **fields) -> None:
    for name, value in fields.items():
        el = page.locator(f'#job-form [name="{name}"]')
        if el.evaluate("e => e.tagName") == "SELECT":
            el.select_option(str(value))
        else:
            el.fill(str(value))


def test_submit_follow_and_inspect_a_job(server, page, tmp_path):
    page.goto(server.url + "/")
    assert page.url == server.url + "/ui"  # the redirect
    page.wait_for_selector("#content:not([hidden])")
    page.click("#job-form summary")  # "data and artifacts"
    fill_form(page, **{"search.strategy": "greedy", "budget": 6, "search.max_candidates": 12,
                       "data.calib_size": 8, "data.val_size": 32, "data.test_limit": 90})
    page.click('#job-form button[type="submit"]')
    link = page.wait_for_selector("#submitted-link")
    job_id = link.get_attribute("href").rsplit("/", 1)[1]
    row = f'#jobs-table tr[data-job="{job_id}"]'
    page.wait_for_selector(row)
    page.wait_for_selector(f'{row}[data-status="succeeded"]', timeout=240_000)
    seen = page.get_attribute(row, "data-seen").split()
    assert seen[0] == "queued" and seen[-1] == "succeeded", seen  # watched it go through
    job = server.http.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["request"]["search"]["max_candidates"] == 12
    drop = (job["result"]["fp32_top1"] - job["result"]["top1"]) * 100
    assert f"{job['result']['top1'] * 100:.2f}%" in page.inner_text(f"{row} td.result")
    assert f"{abs(drop):.2f} pts" in page.inner_text(f"{row} td.result")
    shots = tmp_path / "shots"
    page.screenshot(path=shots / "jobs.png")
    check_png(shots / "jobs.png", VIEWPORT["width"], VIEWPORT["height"])

    page.click(f"{row} a")
    page.wait_for_url(f"**/ui/jobs/{job_id}")
    page.wait_for_selector("#layers tbody tr")
    assert page.inner_text("#job-status") == "succeeded"
    assert page.is_hidden("#cancel")
    # The chart: one point per front candidate, the front computed here from the same rows.
    candidates = server.http.get(f"/jobs/{job_id}/candidates").json()
    points = [{"key": c["key"], "kl": c["kl"], "agreement": c["agreement"], **c["costs"]}
              for c in candidates]
    front = pareto_front(points)
    dots = page.locator("#pareto .front-point")
    assert dots.count() == len(front) >= 1
    assert [dots.nth(i).get_attribute("data-key") for i in range(len(front))] == \
        [p["key"] for p in front]
    assert page.locator("#pareto .cand-point").count() == len(candidates) - len(front)
    chosen = job["result"]["search"]["key"]
    assert page.get_attribute("#pareto .chosen", "data-key") == chosen
    dots.nth(0).hover()
    tip = page.inner_text("#tooltip")
    first = front[0]
    assert f"W {first['weight_bits']:.2f} bits" in tip and \
        f"A {first['activation_bits']:.2f} bits" in tip and "KL" in tip, tip
    assert f"agreement {first['agreement'] * 100:.1f}%" in tip, tip
    # The candidates table, sorted by KL on a click, then the other way.
    rows = page.locator("#candidates tbody tr")
    assert rows.count() == len(candidates)
    page.click('#candidates th[data-key="kl"]')
    by_kl = [c["key"] for c in sorted(candidates, key=lambda c: (c["kl"], c["seq"]))]
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.key)") == by_kl
    page.click('#candidates th[data-key="kl"]')
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.key)")[0] == by_kl[-1]
    assert page.get_attribute('#candidates th[data-key="kl"]', "aria-sort") == "descending"
    # Per layer, from report.json; the plots; the downloads with their sizes and sha256.
    artifacts = server.http.get(f"/jobs/{job_id}/artifacts").json()
    report = next(a for a in artifacts if a["kind"] == "report")
    layers = server.http.get(report["url"]).json()["layers"]
    assert page.locator("#layers tbody tr").count() == len(layers)
    v2sf = next(n for n, q in layers.items() if "split_threshold" in q)
    assert "τ =" in page.inner_text(f'#layers tr:has(td:text-is("{v2sf}"))')
    plots = [a for a in artifacts if a["kind"] == "plot"]
    assert plots and page.locator("#plots img").count() == len(plots)
    wait_for(lambda: page.evaluate("() => [...document.querySelectorAll('#plots img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)"),
             60, "the plots to load")
    assert page.locator("#downloads tbody tr").count() == len(artifacts)
    shown = page.inner_text("#downloads")
    assert all(a["sha256"] in shown for a in artifacts)
    ckpt = next(a for a in artifacts if a["kind"] == "checkpoint")
    with page.expect_download() as info:
        page.click(f'#downloads a:text-is("{ckpt["name"]}")')
    saved = tmp_path / "ckpt.safetensors"
    info.value.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == ckpt["sha256"]
    page.locator("#overview").scroll_into_view_if_needed()
    page.screenshot(path=shots / "job.png")
    check_png(shots / "job.png", VIEWPORT["width"], VIEWPORT["height"])
    page.screenshot(path=shots / "job-full.png", full_page=True)
    check_png(shots / "job-full.png", VIEWPORT["width"], 2 * VIEWPORT["height"])


def test_a_bad_field_shows_the_apis_message(server, page):
    page.goto(server.url + "/ui")
    page.wait_for_selector("#content:not([hidden])")
    before = server.http.get("/jobs").json()["total"]
    fill_form(page, **{"quant.w_bits": 12})
    page.click('#job-form button[type="submit"]')
    api = server.http.post("/jobs", json={"quant": {"w_bits": 12}, "artifacts": {"plots": True}})
    assert api.status_code == 422
    (issue,) = api.json()["detail"]
    assert issue["loc"] == ["body", "quant", "w_bits"]
    span = '.field-error[data-for="quant.w_bits"]'
    page.wait_for_selector(f"{span}:not(:empty)")
    assert page.inner_text(span) == issue["msg"]
    assert page.inner_text("#form-error") == ""
    # A check beyond the schema answers a sentence; it goes beside the model field.
    fill_form(page, **{"quant.w_bits": 8, "model": "no_such_model_xyz"})
    page.click('#job-form button[type="submit"]')
    page.wait_for_selector('.field-error[data-for="model"]:not(:empty)')
    sentence = server.http.post("/jobs", json={"model": "no_such_model_xyz"}).json()["detail"]
    assert page.inner_text('.field-error[data-for="model"]') == sentence
    assert page.inner_text(span) == ""  # the earlier message is gone
    # The greedy strategy without a budget: a model-level issue on "search", beside strategy.
    fill_form(page, model="digits_vit", **{"search.strategy": "greedy"})
    page.click('#job-form button[type="submit"]')
    strategy = '.field-error[data-for="search.strategy search"]'
    page.wait_for_selector(f"{strategy}:not(:empty)")
    assert "needs a budget" in page.inner_text(strategy)
    assert server.http.get("/jobs").json()["total"] == before  # nothing was queued


def test_cancel_from_the_job_page(server, page):
    # Long enough to still be queued or running when the button is pressed.
    job = server.http.post("/jobs", json={
        "data": SMALL_DATA, "artifacts": {"plots": False},
        "search": {"strategy": "evolutionary", "population": 8, "generations": 1000}}).json()
    page.goto(f"{server.url}/ui/jobs/{job['id']}")
    page.wait_for_selector("#cancel:not([hidden])")
    page.click("#cancel")
    page.wait_for_selector('#job-status [data-status="cancelled"]', timeout=120_000)
    assert server.http.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"
    assert page.is_hidden("#cancel")
    page.wait_for_selector("#downloads tbody tr")  # a cancelled job's (empty) file list
    assert "no files" in page.inner_text("#downloads")


def test_the_token_prompt_guards_every_page(token_server, browser):
    job = token_server.http.post("/jobs", json={"model": "digits_vit"}).json()
    context = browser.new_context(viewport=VIEWPORT)
    sent: list = []
    context.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
    page = context.new_page()
    try:
        for url in ("/ui", f"/ui/jobs/{job['id']}"):
            page.goto(token_server.url + url)
            page.wait_for_selector("#auth:not([hidden])")
            assert page.is_hidden("#content")
            assert job["id"] not in page.inner_text("body")  # nothing about jobs
        # A wrong token is refused and asked for again.
        page.fill("#token-input", "wrong")
        page.click('#token-form button[type="submit"]')
        page.wait_for_selector("#token-error:has-text('refused')")
        assert page.is_hidden("#content")
        page.fill("#token-input", TOKEN)
        page.click('#token-form button[type="submit"]')
        page.wait_for_selector(f'#job-id:text-is("{job["id"]}")')
        assert page.is_hidden("#auth")
        page.goto(token_server.url + "/ui")
        page.wait_for_selector(f'#jobs-table tr[data-job="{job["id"]}"]')
        # The token: in sessionStorage only, sent as the bearer header, never in a URL or cookie.
        assert page.evaluate("sessionStorage.getItem('tsptq-token')") == TOKEN
        assert page.evaluate("document.cookie") == "" and context.cookies() == []
        assert not any(TOKEN in u or "wrong" in u.split("/")[-1] for u, _ in sent)
        api_calls = [(u, a) for u, a in sent if "/jobs" in u and "/ui/" not in u]
        assert api_calls and any(a is not None for _, a in api_calls)
        # Another browser session starts without it.
        other = browser.new_context(viewport=VIEWPORT)
        fresh = other.new_page()
        fresh.goto(token_server.url + "/ui")
        fresh.wait_for_selector("#auth:not([hidden])")
        other.close()
        # Forgetting it guards the page again.
        page.click("#signout")
        page.wait_for_selector("#auth:not([hidden])")
        assert page.evaluate("sessionStorage.getItem('tsptq-token')") is None
    finally:
        context.close()


def test_without_chromium_ci_fails_rather_than_skips(monkeypatch):
    from _pytest.outcomes import Failed, Skipped

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(Skipped):
        _unavailable("no Chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match="CI is set"):
        _unavailable("no Chromium")
