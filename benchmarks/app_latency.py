"""Latency of the Streamlit app as a user sees it: a real browser (Debian's chromium through playwright) against
`streamlit run app.py`, on the built-in MiniNSD demo bundle by default.

Measures, in one run:

0. the demo cache (``ensure_world`` + ``ensure_demo_bundle``, what the app's first start builds), done first in
   this process so the server finds it ready; reported separately (a few ms when it is already built);
1. cold start: server process start -> first page (ROI designer) fully rendered: title, script finished and
   the fsaverage5 surface figure (both hemispheres) drawn (target <= 15 s);
2. warm page switch: click another page in the sidebar navigation -> its title shown, its script finished and
   its images decoded; median of ``--switches`` clicks (target <= 1 s);
3. generate -> final image: "Reconstruct" on the Browse page for test trials 0 and 1 of subject 1 at the
   paper's default schedule (50 DDIM steps, strength 0.75) -> the final image decoded in the browser
   (target <= 3 s), against the baseline of the same reconstructions in this process through
   :class:`~brain_diffuser_core.pipeline.BrainDiffuser` (same bundle, seed, steps and preview cadence as the
   page, after one warm-up), with the ratio browser / baseline;
4. ``--sessions`` browser sessions (separate contexts) on the Browse page pressing "Reconstruct" at once (the
   clicks are issued back to back, a few ms apart): whether all finish, errors, and per session the wait
   (click -> its stage-1 image or first diffusion preview appears: its turn at the model lock plus features
   and stage 1) and the total (click -> final image decoded), beside the pipeline's own time for it (features
   + stage 1 + stage 2, from the page's timing caption; it includes no queueing).

    python benchmarks/app_latency.py [--url http://127.0.0.1:8501] [--port 8502] [--sessions 4] [--threads N]
                                     [--switches 6] [--out figures.json]

Without ``--url`` the script starts the server itself (no ``BRAIN_DIFFUSER_BUNDLE``: the demo) on loopback
and stops it at the end; with ``--url`` it measures that running server (cold start is then not measured, and
the baseline still uses this machine's demo bundle). ``--threads N`` sets torch's threads here and
``OMP_NUM_THREADS`` for the server it starts (default: torch's own choice here; the server then uses the app's default,
half the cores or $BRAIN_DIFFUSER_THREADS).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MAIN_H1 = '[data-testid="stMain"] h1'
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'
TIMEOUT_MS = 300_000
PAGES = {"ROI designer": "ROI designer", "Browse trials": "Browse test trials", "Walkthrough": "Walkthrough"}
SUBJECT = 1

# JavaScript probes, evaluated in the page
JS_IMAGES_READY = """n => { const imgs = [...document.querySelectorAll('[data-testid="stImage"] img')];
    return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0); }"""
JS_FINAL_READY = """() => [...document.querySelectorAll('[data-testid="stImage"]')].some(el => {
    const cap = el.parentElement.querySelector('[data-testid="stImageCaption"]');
    const img = el.querySelector('img');
    return cap && /^final \\(seed \\d+\\)$/.test(cap.innerText) && img && img.complete && img.naturalWidth > 0; })"""
JS_STATE = """() => {
    const caps = [...document.querySelectorAll('[data-testid="stImageCaption"]')].map(c => c.innerText);
    const timing = [...document.querySelectorAll('[data-testid="stCaptionContainer"]')].map(c => c.innerText)
        .find(t => /^features [0-9.]+ s, stage 1/.test(t)) || '';
    return {started: caps.some(c => c.startsWith('stage 1') || c.startsWith('diffusion preview')), timing: timing,
            errors: [...document.querySelectorAll('[data-testid="stException"], [data-testid="stAlertContentError"]')]
                    .map(e => e.innerText.slice(0, 300))}; }"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _verdict(value: float, target: float) -> str:
    return f"target <= {target:g} s: {'met' if value <= target else 'NOT met'}"


# ------------------------------------------------------------------------------------------------ phases
def build_demo_cache() -> tuple[str, str, float]:
    """(bundle folder, world root, seconds): the app's demo sources, built here if missing (as the app does)."""
    from brain_diffuser_core.world.build import ensure_world
    from brain_diffuser_core.world.demo import ensure_demo_bundle

    t = time.perf_counter()
    root = Path(ensure_world()).resolve()
    bundle = Path(ensure_demo_bundle(world_root=root)).resolve()
    return str(bundle), str(root), time.perf_counter() - t


def start_server(port: int, threads: int | None, log_path: Path) -> subprocess.Popen:
    """`streamlit run app.py` as `make run` starts it, on the demo (no BRAIN_DIFFUSER_BUNDLE)."""
    env = {k: v for k, v in os.environ.items() if k not in ("BRAIN_DIFFUSER_BUNDLE", "BRAIN_DIFFUSER_NSD_ROOT")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless",
                             "true", "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                            cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)


def wait_rendered(page, title: str, n_images: int = 0) -> None:
    """The page titled ``title`` is shown, its script run finished and ``n_images`` images decoded."""
    page.wait_for_function("t => [...document.querySelectorAll('[data-testid=\"stMain\"] h1')]"
                           ".some(h => h.innerText.trim() === t)", arg=title)
    page.wait_for_selector(IDLE)
    if n_images:
        page.wait_for_function(JS_IMAGES_READY, arg=n_images)


def open_first_page(page, url: str, deadline: float) -> None:
    """Load the app (retrying while the server is not up yet) until the ROI designer is fully rendered."""
    while True:
        try:
            page.goto(url, wait_until="domcontentloaded")
            break
        except Exception as err:  # connection refused while the server starts
            if time.time() > deadline:
                raise RuntimeError(f"the app at {url} did not answer: {err}") from None
            time.sleep(0.2)
    wait_rendered(page, PAGES["ROI designer"])
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .gl-container canvas').length >= 1")


def warm_switches(page, n: int) -> list[tuple[str, float]]:
    """(page, seconds) from a navigation click to the page rendered, alternating Browse <-> ROI designer."""
    order = ["Browse trials", "ROI designer"]
    out = []
    for i in range(n):
        label = order[i % 2]
        link = page.locator('[data-testid="stSidebarNav"] a', has_text=label)
        t = time.perf_counter()
        link.click()
        wait_rendered(page, PAGES[label], n_images=1 if label == "Browse trials" else 0)
        if label == "ROI designer":
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .gl-container canvas').length >= 1")
        out.append((label, time.perf_counter() - t))
    return out


def set_trial(page, index: int) -> None:
    """Choose test trial ``index`` on the Browse page; returns once the page shows it, not yet reconstructed."""
    box = page.get_by_role("spinbutton", name="Test trial index", exact=False)
    if box.input_value() == str(index):
        return
    box.fill(str(index))
    box.press("Enter")
    # the rerun replaces the previous trial's final image by the "Press Reconstruct" note
    page.wait_for_function(f"() => !({JS_FINAL_READY})() && document.querySelector('{IDLE}') !== null && "
                           "[...document.querySelectorAll('[data-testid=\"stAlertContainer\"]')]"
                           ".some(a => a.innerText.includes('Press Reconstruct'))")


def press_and_watch(pages: list) -> list[dict]:
    """Click "Reconstruct" on every page back to back; poll them all until each shows its final image."""
    clicks, first_progress, done, errors = [], [None] * len(pages), [None] * len(pages), [[] for _ in pages]
    for pg in pages:
        pg.get_by_role("button", name="Reconstruct", exact=True).click(no_wait_after=True)
        clicks.append(time.perf_counter())
    deadline = time.perf_counter() + TIMEOUT_MS / 1000
    while any(d is None for d in done) and time.perf_counter() < deadline:
        for i, pg in enumerate(pages):
            if done[i] is not None:
                continue
            state = pg.evaluate(JS_STATE)
            now = time.perf_counter()
            if first_progress[i] is None and state["started"]:
                first_progress[i] = now
            if state["errors"]:
                errors[i] = state["errors"]
                done[i] = float("nan")
            elif pg.evaluate(JS_FINAL_READY):
                done[i] = now
        time.sleep(0.02)
    out = []
    for pg, c, fp, d, err in zip(pages, clicks, first_progress, done, errors):
        timing = pg.evaluate(JS_STATE)["timing"]  # the page's own caption of the pipeline's timings
        server = sum(float(x) for x in re.findall(r"([0-9.]+) s\b", timing)) if timing else None
        out.append({"wait_s": (fp - c) if fp else None, "total_s": (d - c) if d is not None else None,
                    "pipeline_s": server, "finished": d is not None and d == d and not err, "errors": err})
    return out


def baseline(bundle: str, world: str, rows: list[int], steps: int) -> list[float]:
    """Seconds of the same reconstructions in this process (after one warm-up on another trial)."""
    from brain_diffuser_core.nsd import load_subject
    from brain_diffuser_core.pipeline import BrainDiffuser

    subj = load_subject(world, SUBJECT, progress=False)
    bd = BrainDiffuser(bundle, device="auto")
    every = max(1, steps // 10)  # the Browse page's "Run live" preview cadence
    ids = [int(i) for i in subj.test_image_ids]

    def one(row: int) -> float:
        t = time.perf_counter()
        bd.reconstruct(subj.test_fmri[row:row + 1], SUBJECT, image_ids=[ids[row]], base_seed=0,
                       num_inference_steps=steps, callback=lambda *a: None, preview_every=every)
        return time.perf_counter() - t

    one(max(rows) + 1)  # warm-up
    return [one(r) for r in rows]


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="measure this running server instead of starting one")
    ap.add_argument("--port", type=int, default=None, help="port of the server started here (default: a free one)")
    ap.add_argument("--sessions", type=int, default=4, help="simultaneous browser sessions (default 4)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads here and OMP_NUM_THREADS of the server started here (default: torch's own "
                         "default in both, as `make run` leaves it)")
    ap.add_argument("--switches", type=int, default=6, help="timed page switches (default 6)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM schedule (default 50, the paper's; the app's default)")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # each figure as soon as it is measured
    if not Path(CHROMIUM).is_file():
        ap.error(f"Debian's chromium is required at {CHROMIUM} (`make browser` installs it)")
    from playwright.sync_api import sync_playwright

    res: dict = {"threads": torch.get_num_threads(), "steps": args.steps, "sessions": args.sessions}
    bundle, world, res["demo_cache_s"] = build_demo_cache()
    print(f"demo cache (ensure_world + ensure_demo_bundle): {res['demo_cache_s']:.2f} s  [{bundle}]")
    print(f"torch threads {torch.get_num_threads()} here"
          + (f" and OMP_NUM_THREADS={args.threads} for the server" if args.threads else " (torch's default), the server's "
             "default too") + "; "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")

    proc, log = None, Path(tempfile.mkdtemp(prefix="app-latency-")) / "server.log"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = ctx.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            if args.url:
                url = args.url.rstrip("/")
                open_first_page(page, url, time.time() + 60)
                res["cold_start_s"] = None
                print("cold start: not measured (--url: the server was already running)")
            else:
                url = f"http://127.0.0.1:{args.port or _free_port()}"
                t = time.perf_counter()
                proc = start_server(int(url.rsplit(":", 1)[1]), args.threads, log)
                open_first_page(page, url, time.time() + 120)
                res["cold_start_s"] = time.perf_counter() - t
                print(f"cold start (server start -> ROI designer rendered): {res['cold_start_s']:.2f} s  "
                      f"{_verdict(res['cold_start_s'], 15)}")

            switches = warm_switches(page, args.switches)
            sw = [t for _, t in switches]
            res["switch_s"] = switches
            per_page = "; ".join(f"to {label}: median {_median([t for p, t in switches if p == label]):.2f} s"
                                 for label in dict.fromkeys(p for p, _ in switches))
            print(f"warm page switch (median of {len(sw)}): {_median(sw):.3f} s  {_verdict(_median(sw), 1)}  "
                  f"[{per_page}]")

            # 3. generate on Browse (the last switch may have left us on either page)
            page.locator('[data-testid="stSidebarNav"] a', has_text="Browse trials").click()
            wait_rendered(page, PAGES["Browse trials"], n_images=1)
            steps_box = page.get_by_role("spinbutton", name="Diffusion schedule (DDIM steps)", exact=True)
            if steps_box.input_value() != str(args.steps):
                steps_box.fill(str(args.steps))
                steps_box.press("Enter")
                page.wait_for_selector(IDLE)
            rows = [0, 1]
            gen, pipe = [], []
            for r in rows:
                set_trial(page, r)
                (one,) = press_and_watch([page])
                if not one["finished"]:
                    raise RuntimeError(f"the reconstruction of trial {r} did not finish: {one['errors']}")
                gen.append(one["total_s"])
                pipe.append(one["pipeline_s"])
            print(f"generate -> final image, browser ({args.steps} steps, trials {rows}): "
                  f"{', '.join(f'{x:.2f}' for x in gen)} s, median {_median(gen):.2f} s  {_verdict(_median(gen), 3)}")
            print(f"  of which the server's pipeline (features + stage 1 + stage 2, as the page reports it): "
                  f"{', '.join(f'{x:.2f}' for x in pipe if x is not None)} s", flush=True)
            base = baseline(bundle, world, rows, args.steps)
            res.update(generate_s=gen, generate_pipeline_s=pipe, baseline_s=base, ratio=_median(gen) / _median(base))
            print(f"  baseline in-process BrainDiffuser.reconstruct: {', '.join(f'{x:.2f}' for x in base)} s, "
                  f"median {_median(base):.2f} s; browser / baseline = {res['ratio']:.2f}x")
            ctx.close()

            # 4. simultaneous sessions
            contexts = [browser.new_context(viewport={"width": 1200, "height": 900}) for _ in range(args.sessions)]
            pages = []
            for c in contexts:
                p = c.new_page()
                p.set_default_timeout(TIMEOUT_MS)
                p.goto(f"{url}/trials")
                wait_rendered(p, PAGES["Browse trials"], n_images=1)
                pages.append(p)
            t = time.perf_counter()
            sessions = press_and_watch(pages)
            wall = time.perf_counter() - t
            res.update(concurrent=sessions, concurrent_wall_s=wall)
            n_ok = sum(s["finished"] for s in sessions)
            print(f"{args.sessions} simultaneous sessions pressing Reconstruct: {n_ok}/{args.sessions} finished, "
                  f"{sum(bool(s['errors']) for s in sessions)} with errors, all done in {wall:.2f} s")
            for i, s in enumerate(sessions):
                w = f"{s['wait_s']:.2f} s" if s["wait_s"] is not None else "n/a"
                tt = f"{s['total_s']:.2f} s" if s["total_s"] is not None else "did not finish"
                pl = f", pipeline {s['pipeline_s']:.2f} s" if s["pipeline_s"] is not None else ""
                print(f"  session {i + 1}: wait (click -> first image) {w}, total (click -> final image) {tt}{pl}"
                      + (f", errors: {s['errors']}" if s["errors"] else ""))
            for c in contexts:
                c.close()
        finally:
            browser.close()
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
