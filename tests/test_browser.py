"""The app in a real browser: `streamlit run app.py` on loopback, driven by Debian's chromium through Python
playwright (never a downloaded browser). Each page is visited in a fresh browser context, its main action is
performed, and the images and the plotly surface must render with no exception box. Screenshots go to
``$BROWSER_SCREENSHOTS`` (default ``test-artifacts/screenshots/`` in the repository).

Without chromium or playwright the tests skip with the reason; when ``$CI`` is set they fail instead.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest

from app_sources import app_server

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
STEPS = 4  # the sidebar's "Diffusion schedule (DDIM steps)": strength 0.75 -> 3 denoising steps
TIMEOUT_MS = 60_000  # a page's first run imports torch, diffusers and nilearn on a loaded 2-core machine
STEPS_LABEL = "Diffusion schedule (DDIM steps)"
MAIN_H1 = '[data-testid="stMain"] h1'  # the page title (the sidebar has an h1 too)


def browser_missing() -> str | None:
    """Why the real-browser tests cannot run here, or None."""
    if not Path(CHROMIUM).is_file():
        return f"Debian's chromium is not installed at {CHROMIUM} (`make browser` installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (`pip install -r requirements.txt`)"
    return None


def screenshot_dir() -> Path:
    folder = Path(os.environ.get("BROWSER_SCREENSHOTS") or ROOT / "test-artifacts" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def browser():
    reason = browser_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the real-browser tests must run, but {reason}", pytrace=False)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory) -> Path:
    """The server's work folder: its cache and ``server.log`` (stdout and stderr)."""
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def server(browser, sources, server_dir):
    """Base URL of `streamlit run app.py` (as `make run` starts it) on the tiny world and bundle."""
    with app_server(sources, server_dir) as url:
        yield url


@pytest.fixture
def page(browser, server, request):
    """A page in a fresh browser context; a screenshot of it is saved when the test ends (pass or fail)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    pg.js_errors = errors
    try:
        yield pg
    finally:
        with contextlib.suppress(Exception):  # a crashed page must not hide the test's own failure
            pg.screenshot(path=str(screenshot_dir() / f"{request.node.name}.png"), full_page=True)
        context.close()


# ------------------------------------------------------------------------------------------------ helpers
def wait_idle(page) -> None:
    """Wait until the script run of this session has finished (Streamlit marks its root element)."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]')


def open_app(page, server: str, path: str = "") -> None:
    """Go to a page of the app, wait for its first run, then set the short diffusion schedule in the sidebar."""
    page.goto(f"{server}/{path}")
    page.wait_for_selector(MAIN_H1)
    wait_idle(page)
    steps = page.get_by_role("spinbutton", name=STEPS_LABEL, exact=True)
    steps.fill(str(STEPS))
    steps.press("Enter")
    page.wait_for_function(f"document.querySelector('[aria-label=\"{STEPS_LABEL}\"]')?.value === '{STEPS}'")
    wait_idle(page)


def assert_clean(page) -> None:
    """No exception box and no st.error in the page; no uncaught JavaScript error."""
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, exceptions.all_inner_texts()
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, errors.all_inner_texts()
    assert page.js_errors == [], page.js_errors


def rendered_images(page) -> list[dict]:
    """[{caption, width, height}] of the st.image elements whose picture the browser has decoded."""
    return page.evaluate("""() => [...document.querySelectorAll('[data-testid="stImage"]')].map(el => {
        const img = el.querySelector('img');
        const cap = el.parentElement.querySelector('[data-testid="stImageCaption"]');
        return {caption: cap ? cap.innerText : (img && img.alt) || '', width: img && img.complete ? img.naturalWidth : 0,
                height: img && img.complete ? img.naturalHeight : 0};
    })""")


def wait_images(page, n: int) -> None:
    """Wait until at least ``n`` st.image pictures are decoded by the browser, and none is still loading."""
    page.wait_for_function("""n => { const imgs = [...document.querySelectorAll('[data-testid="stImage"] img')];
        return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0); }""", arg=n)


def assert_surfaces(page, n: int) -> None:
    """``n`` WebGL plotly charts (the fsaverage5 surfaces), each canvas drawn at a real size."""
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .gl-container canvas').length >= {n}")
    sizes = page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot .gl-container canvas')]
        .map(c => [c.width, c.height])""")
    assert len(sizes) == n, sizes
    assert all(w > 100 and h > 100 for w, h in sizes), sizes


# ------------------------------------------------------------------------------------------------ pages
def test_roi_designer_surface_and_generation(page, server):
    from playwright.sync_api import expect

    open_app(page, server)
    assert page.locator(MAIN_H1).first.inner_text() == "ROI designer"
    assert_surfaces(page, 1)  # one figure holds both hemispheres
    seeds = page.get_by_role("slider", name="Scenes (seeds)")
    seeds.focus()
    seeds.press("ArrowLeft")  # "Scenes (seeds)" 4 -> 2 with the keyboard
    seeds.press("ArrowLeft")
    expect(seeds).to_have_value("2")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("text=/2 scene\\(s\\) for/")
    wait_idle(page)
    wait_images(page, 4)  # 2 scenes + their stage-1 thumbnails
    assert_clean(page)
    images = rendered_images(page)
    finals = [im for im in images if re.fullmatch(r"seed \d+", im["caption"])]
    assert len(finals) == 2, images
    assert all(im["width"] > 0 and im["height"] > 0 for im in images), images
    assert finals[0]["caption"] != finals[1]["caption"]  # each scene its own seed
    assert page.get_by_text(f"{int(STEPS * 0.75)} denoising steps each").count() == 1


def _plot_traces(page) -> list[str]:
    """Names of the traces of the page's first plotly chart (as plotly.js holds them)."""
    return page.evaluate("() => document.querySelector('.js-plotly-plot').data.map(t => t.name || '')")


def _hover_label(page) -> str:
    """The hover label plotly.js writes with the mouse over the first chart, tried at a few points on the
    hemispheres (not the gap between them); '' when none shows one."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator(".js-plotly-plot .gl-container canvas").first.bounding_box()
    for fy in (0.5, 0.4, 0.6):
        for fx in (0.3, 0.7, 0.4, 0.6):
            page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
            with contextlib.suppress(PlaywrightTimeout):  # no label at this point: try the next one
                page.wait_for_selector(".js-plotly-plot .hovertext", timeout=2_000)
                return page.locator(".js-plotly-plot .hovertext").first.text_content() or ""
    return ""


#: a vertex's hover: its hemisphere, fsaverage5 id and the pattern's value (3 significant digits, NaN = no value)
HOVER = re.compile(r"(left|right) \d+: weight ([-\u2212]?\d[\d.]*(e[+-]?\d+)?|NaN)")


def test_roi_designer_surface_and_flat_map_with_roi_outlines(page, server):
    """A fixture subject (the tiny world's subject 1, read through NSD-format transform files and surface labels)
    on the inflated surface and on the flat map, with the outlines of V1 and faces: a screenshot of each chart."""
    open_app(page, server)
    faces = page.get_by_role("slider", name=re.compile(r"^faces: "))
    faces.focus()
    for _ in range(10):  # 0 -> 1.0 in steps of 0.1
        faces.press("ArrowRight")
    page.wait_for_selector("text=/V1\\+faces/")
    wait_idle(page)
    assert_surfaces(page, 1)
    assert_clean(page)
    assert {"left", "right", "V1", "faces"} <= set(_plot_traces(page))
    label = _hover_label(page)  # the values on hover, from the figure's binary customdata
    assert HOVER.fullmatch(label.strip()), label
    page.locator(".js-plotly-plot").first.screenshot(path=str(screenshot_dir() / "surface_subject1_V1_faces.png"))
    page.get_by_text("flat map", exact=True).click()
    page.wait_for_function("document.querySelector('.js-plotly-plot')?._fullLayout?.scene?.camera?.projection?.type"
                           " === 'orthographic'")
    wait_idle(page)
    assert_surfaces(page, 1)
    assert_clean(page)
    assert {"left", "right", "V1", "faces"} <= set(_plot_traces(page))
    label = _hover_label(page)
    assert HOVER.fullmatch(label.strip()), label
    page.locator(".js-plotly-plot").first.screenshot(path=str(screenshot_dir() / "flatmap_subject1_V1_faces.png"))


def test_browse_reconstructs_a_trial(page, server):
    open_app(page, server, "trials")
    assert page.locator(MAIN_H1).first.inner_text() == "Browse test trials"
    wait_images(page, 1)
    assert [im["caption"] for im in rendered_images(page)][0].startswith("original (73k id ")
    page.get_by_role("button", name="Reconstruct", exact=True).click()
    page.wait_for_selector("text=/^final \\(seed \\d+\\)$/")
    wait_idle(page)
    wait_images(page, 3)
    assert_clean(page)
    captions = {im["caption"].split(" (")[0]: im for im in rendered_images(page)}
    assert {"original", "stage 1", "final"} <= set(captions), list(captions)
    assert all(im["width"] > 0 for im in captions.values())
    assert page.get_by_text(re.compile(r"stage 2 [0-9.]+ s \(3 denoising steps\)")).count() == 1
    assert page.get_by_text("Download final (PNG)").count() == 1


def test_walkthrough_runs_the_trial(page, server):
    open_app(page, server, "step-by-step")
    assert page.locator(MAIN_H1).first.inner_text() == "Walkthrough"
    page.get_by_role("button", name="Run this trial").click()
    page.wait_for_selector("text=5. Final reconstruction")
    wait_idle(page)
    wait_images(page, 4)
    assert_clean(page)
    # the trial's fMRI pattern (one figure, both hemispheres), and the two CLIP heat maps (2-D plotly, no WebGL)
    assert_surfaces(page, 1)  # counts the WebGL plots only; the heat maps are SVG
    assert page.locator(".js-plotly-plot").count() == 3
    images = rendered_images(page)
    names = [im["caption"] for im in images]
    assert any(c.startswith("stage 1") for c in names) and any(c.startswith("final (seed") for c in names), names
    assert any(c.startswith("step ") for c in names), names  # the diffusion previews
    assert all(im["width"] > 0 for im in images), images


def test_every_page_in_the_navigation_renders(page, server):
    """Walk the sidebar's navigation (whatever pages app.py lists, e.g. the Evaluation page) in one session:
    each click switches page without a reload and the page renders its title with no error."""
    open_app(page, server)
    links = page.locator('[data-testid="stSidebarNav"] a')
    titles = [t.strip().splitlines()[-1].strip() for t in links.all_inner_texts()]  # (the icon is a ligature)
    assert {"ROI designer", "Browse trials", "Walkthrough"} <= set(titles), titles
    seen = []
    for i, title in enumerate(titles):
        href = links.nth(i).get_attribute("href")
        links.nth(i).click()
        page.wait_for_url(href)
        page.wait_for_selector(MAIN_H1)
        wait_idle(page)
        assert_clean(page)
        seen.append(page.locator(MAIN_H1).first.inner_text())
        page.screenshot(path=str(screenshot_dir() / f"nav_{re.sub(r'[^a-z0-9]+', '_', title.lower())}.png"))
    assert len(set(seen)) == len(titles), seen  # every link showed its own page
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1  # no full reload


# ------------------------------------------------------------------------------------------------ queue
def _log_lines(path: Path, start: int) -> list[str]:
    return [ln.split("generation queue: ", 1)[1] for ln in path.read_text(errors="replace")[start:].splitlines()
            if "generation queue: " in ln]


def test_a_tab_closed_while_queued_drops_its_ticket(browser, server, server_dir):
    """Tab A generates 8 ROI scenes with the longest schedule; tab B presses Reconstruct and waits behind it;
    B's tab is closed while it waits. The server log then shows B's ticket withdrawn (queue length back to A's
    one generation), A's generation done, and no generation run for B."""
    import time

    from playwright.sync_api import expect

    log = server_dir / "server.log"
    start = len(log.read_text(errors="replace"))
    ctx_a = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx_b = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        a, b = ctx_a.new_page(), ctx_b.new_page()
        for pg in (a, b):
            pg.set_default_timeout(3 * TIMEOUT_MS)  # tab A's 8 scenes of 150 steps take a while on a loaded core
        open_app(a, server)  # the root first: a process's first run of a page url shows "Page not found"
        open_app(b, server, "trials")
        steps = a.get_by_role("spinbutton", name=STEPS_LABEL, exact=True)
        steps.fill("200")
        steps.press("Enter")
        wait_idle(a)
        seeds = a.get_by_role("slider", name="Scenes (seeds)")
        seeds.focus()
        for _ in range(4):
            seeds.press("ArrowRight")  # 4 -> 8 scenes
        expect(seeds).to_have_value("8")
        wait_idle(a)
        a.get_by_role("button", name="Generate").click()
        a.wait_for_selector("text=/stage2: step/")  # A holds the models
        b.get_by_role("button", name="Reconstruct", exact=True).click()
        b.wait_for_selector("text=/Waiting: 1 generation ahead of you/")
        drawn = [ln for ln in _log_lines(log, start) if ln.endswith("drawn, queue length 2")]
        assert len(drawn) == 1, _log_lines(log, start)
        b_ticket = drawn[0].split()[1]
        ctx_b.close()  # the student closes the tab while queued
        deadline = time.time() + 60
        while not any(ln.startswith(f"ticket {b_ticket} withdrawn") for ln in _log_lines(log, start)):
            assert time.time() < deadline, _log_lines(log, start)
            time.sleep(0.2)
        a.wait_for_selector("text=/8 scene\\(s\\) for/", timeout=600_000)
        time.sleep(2 * 1.0 + 1)  # two heartbeats more: nothing may start for B afterwards
        lines = _log_lines(log, start)
        print("\n".join(lines))
        withdrawn = [ln for ln in lines if ln.startswith(f"ticket {b_ticket} withdrawn")]
        assert len(withdrawn) == 1 and withdrawn[0].endswith("queue length 1"), lines  # only A's generation left
        assert f"ticket {b_ticket} runs" not in lines and not any(ln.startswith(f"ticket {b_ticket} done") for ln in lines)
        a_ticket = str(int(b_ticket) - 1)
        assert f"ticket {a_ticket} runs" in lines and lines[-1] == f"ticket {a_ticket} done, queue length 0", lines
        wait_idle(a)
        a.screenshot(path=str(screenshot_dir() / "queue_tab_a_after_b_left.png"))
    finally:
        with contextlib.suppress(Exception):
            a.screenshot(path=str(screenshot_dir() / "queue_tab_a.png"), full_page=True)
        ctx_a.close()
        with contextlib.suppress(Exception):
            b.screenshot(path=str(screenshot_dir() / "queue_tab_b.png"), full_page=True)
        with contextlib.suppress(Exception):
            ctx_b.close()
