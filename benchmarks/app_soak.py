"""Soak test of the app as a lab meeting uses it: N real browser sessions (Debian's chromium through playwright)
against one `streamlit run app.py` on loopback, each doing a scripted random mix for T minutes.

The mix (each session its own seeded random order, one action at a time):

* ``switch``: click another page in the sidebar navigation -> its title shown and its script finished;
* ``roi_generate``: ROI designer, "Generate" (4 seeds) -> the scenes shown;
* ``reconstruct``: Browse, a random test trial, "Reconstruct" -> the final image decoded (a trial this session
  has already reconstructed is cached: another is chosen);
* ``upload_good`` / ``upload_bad``: ROI designer, upload a valid voxel vector (.npy) / a wrong-length one ->
  "Using ..." / the error naming the expected shape (the refusal is the expected outcome, not an error);
* ``close_queued``: a fresh tab on Browse presses "Reconstruct" and is closed at once, often while queued
  behind the others' generations; the session carries on in its own tab.

Printed: completed actions per kind, errors (exception boxes, unexpected error boxes, timeouts) with their text,
the wait of each generation (click -> its first progress or image: its turn at the shared models plus features)
and each action's duration as p50 / p95, the server's queue events from its log (tickets drawn, run,
withdrawn: closed tabs), and the server's RSS (psutil, server process and its children) every ``--rss-every``
seconds from the start of the mix (the sessions are opened first, untimed), with the growth after warm-up (the
first ``--warmup`` minutes of the mix, default a third of the run up to 2). Exits 1 on any error or when no
action completed.

    python benchmarks/app_soak.py --sessions 8 --minutes 10 [--threads 1] [--steps 50] [--url URL --server-pid PID]
                                  [--out soak.json]

Without ``--url`` the server is started here on the demo (as `make run` does, loopback, the demo cache built
first) and stopped at the end; run everything on one core with ``taskset -c 1`` (the server inherits it). Where
other checkouts share ``~/.cache/brain-diffuser-explorer`` and may rebuild its demo bundle meanwhile (the server
then reports "bundle ... was replaced after it was opened"), give this run its own copy:
``BRAIN_DIFFUSER_CACHE=/tmp/soak-cache`` (copied from the shared one, or built there on first use).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_latency import (CHROMIUM, CHROMIUM_ARGS, IDLE, JS_FINAL_READY, MAIN_H1, PAGES, _free_port,  # noqa: E402
                         build_demo_cache, start_server)

ACTIONS = {"switch": 3, "roi_generate": 2, "reconstruct": 3, "upload_good": 1, "upload_bad": 1, "close_queued": 1}
ACTION_TIMEOUT_MS = 240_000
JS_ERRORS = """() => [...document.querySelectorAll('[data-testid="stException"], [data-testid="stAlertContentError"]')]
    .map(e => e.innerText.slice(0, 300))"""
STEPS_LABEL = "Diffusion schedule (DDIM steps)"
#: error boxes the mix causes on purpose: a wrong-length upload, the upload rate limit
EXPECTED_ERRORS = ("the array must have one value per voxel", "too many uploads from this browser")


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs by linear interpolation; nan when empty."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def npy_bytes(arr) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


class Session:
    """One student's browser context and its scripted actions."""

    def __init__(self, index: int, browser, url: str, steps: int, n_voxels: int, n_test: int, stats: dict):
        self.i, self.browser, self.url, self.steps, self.stats = index, browser, url, steps, stats
        self.rng = random.Random(1000 + index)
        self.n_test = n_test
        self.reconstructed: set[int] = set()
        import numpy as np

        good = np.zeros(n_voxels, np.float32)
        good[: max(1, n_voxels // 10)] = 1.0
        self.good, self.bad = npy_bytes(good), npy_bytes(np.zeros(n_voxels + 7, np.float32))

    async def open(self) -> None:
        self.ctx = await self.browser.new_context(viewport={"width": 1300, "height": 950})
        self.page = await self.ctx.new_page()
        self.page.set_default_timeout(ACTION_TIMEOUT_MS)
        await self.page.goto(self.url)
        await self.rendered("ROI designer")
        await self.set_steps(self.page)

    async def set_steps(self, page) -> None:
        box = page.get_by_role("spinbutton", name=STEPS_LABEL, exact=True)
        if await box.input_value() != str(self.steps):
            await box.fill(str(self.steps))
            await box.press("Enter")
            await page.wait_for_function(f"document.querySelector('[aria-label=\"{STEPS_LABEL}\"]')?.value === "
                                         f"'{self.steps}'")
            await page.wait_for_selector(IDLE)

    async def rendered(self, label: str, page=None) -> None:
        page = page or self.page
        await page.wait_for_function("t => [...document.querySelectorAll('[data-testid=\"stMain\"] h1')]"
                                     ".some(h => h.innerText.trim() === t)", arg=PAGES[label])
        await page.wait_for_selector(IDLE)

    async def goto_page(self, label: str, page=None) -> None:
        page = page or self.page
        title = await page.locator(MAIN_H1).first.inner_text()
        if title.strip() != PAGES[label]:
            await page.locator('[data-testid="stSidebarNav"] a', has_text=label).click()
            await self.rendered(label, page)

    async def errors(self) -> list[str]:
        """Error boxes on the page, less the refusals the mix provokes on purpose (they stay shown while the
        refused file stays in the uploader)."""
        found = await self.page.evaluate(JS_ERRORS)
        return [e for e in found if not any(x in e for x in EXPECTED_ERRORS)]

    # ------------------------------------------------------------------ actions
    async def switch(self) -> None:
        label = self.rng.choice(list(PAGES))
        await self.goto_page(label)

    async def roi_generate(self) -> float | None:
        await self.goto_page("ROI designer")
        t = time.perf_counter()
        await self.page.get_by_role("button", name="Generate").click()
        # this run's progress bar or queue place (the last run's elements show "done" / "Generated ...")
        await self.page.wait_for_selector("text=/decoding features|stage[12]: step|Waiting: \\d+ generation/")
        await self.page.wait_for_selector("text=/stage[12]: step|Generated \\d+ scene|Generation failed/")
        wait = time.perf_counter() - t  # its turn at the models came (or it was already done)
        await self.page.wait_for_selector("text=/Generated \\d+ scene|Generation failed/")
        await self.page.wait_for_selector(IDLE)
        return wait

    async def reconstruct(self) -> float | None:
        await self.goto_page("Browse trials")
        fresh = [r for r in range(self.n_test) if r not in self.reconstructed] or list(range(self.n_test))
        row = self.rng.choice(fresh)
        box = self.page.get_by_role("spinbutton", name="Test trial index", exact=False)
        if await box.input_value() != str(row):
            await box.fill(str(row))
            await box.press("Enter")
            await self.page.wait_for_selector(IDLE)
        button = self.page.get_by_role("button", name="Reconstruct", exact=True)
        if not await button.count():  # cached (every trial done once): nothing to run
            return None
        t = time.perf_counter()
        await button.click()
        await self.page.wait_for_function("""() => [...document.querySelectorAll('[data-testid="stImageCaption"]')]
            .some(c => c.innerText.startsWith('stage 1') || c.innerText.startsWith('diffusion preview'))
            || document.querySelector('[data-testid="stAlertContentError"], [data-testid="stException"]') !== null""")
        wait = time.perf_counter() - t
        await self.page.wait_for_function(JS_FINAL_READY)
        await self.page.wait_for_selector(IDLE)
        self.reconstructed.add(row)
        return wait

    async def _upload(self, name: str, data: bytes, expect: str) -> None:
        await self.goto_page("ROI designer")
        box = self.page.locator('[data-testid="stFileUploader"]', has_text="upload a pattern")
        await box.locator('input[type="file"]').set_input_files(
            files=[{"name": name, "mimeType": "application/octet-stream", "buffer": data}])
        await self.page.wait_for_selector(f"text=/{expect}|{name}: too many uploads/")
        await self.page.wait_for_selector(IDLE)
        if await self.page.get_by_text(f"{name}: too many uploads").count():
            self.stats["refused_rate_limit"] += 1

    async def upload_good(self) -> None:
        name = f"good{self.rng.randrange(10**6)}.npy"
        await self._upload(name, self.good, f"Using {name}")

    async def upload_bad(self) -> None:
        name = f"bad{self.rng.randrange(10**6)}.npy"
        await self._upload(name, self.bad, f"{name}: the array must have one value per voxel")

    async def close_queued(self) -> None:
        ctx = await self.browser.new_context(viewport={"width": 1000, "height": 800})
        page = await ctx.new_page()
        page.set_default_timeout(ACTION_TIMEOUT_MS)
        try:
            await page.goto(f"{self.url}/trials")
            await self.rendered("Browse trials", page)
            await self.set_steps(page)
            await page.get_by_role("button", name="Reconstruct", exact=True).click()
            try:
                await page.wait_for_selector("text=/Waiting: \\d+ generation/", timeout=3000)
                self.stats["closed_while_waiting"] += 1
            except Exception:
                self.stats["closed_not_seen_waiting"] += 1
        finally:
            await ctx.close()

    async def run(self, deadline: float) -> None:
        kinds, weights = list(ACTIONS), list(ACTIONS.values())
        while time.perf_counter() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            t = time.perf_counter()
            try:
                wait = await getattr(self, kind)()
                errs = await self.errors()
                if errs:
                    raise RuntimeError("; ".join(errs))
            except Exception as err:  # a timeout or an error box: count it, reload the session's page
                self.stats["errors"].append(f"session {self.i} {kind}: {str(err).splitlines()[0][:300]}")
                try:
                    await self.ctx.close()
                    await self.open()
                except Exception as err2:
                    self.stats["errors"].append(f"session {self.i} reopen: {str(err2).splitlines()[0][:300]}")
                continue
            self.stats["done"][kind] += 1
            self.stats["durations"][kind].append(time.perf_counter() - t)
            if wait is not None:
                self.stats["waits"].append(wait)
        await self.ctx.close()


async def sample_rss(pid: int | None, every: float, samples: list, stop: asyncio.Event, t0: float) -> None:
    """Append (minutes since t0, RSS MiB of pid and its children) every ``every`` seconds until ``stop``."""
    if pid is None:
        return
    import psutil

    proc = psutil.Process(pid)
    while True:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            return
        samples.append(((time.perf_counter() - t0) / 60, rss / 2**20))
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
            return
        except asyncio.TimeoutError:
            pass


def queue_events(log: Path | None) -> Counter:
    """Counts of the server log's generation-queue events (drawn, runs, withdrawn, done)."""
    out: Counter = Counter()
    if log is None or not log.is_file():
        return out
    for line in log.read_text(errors="replace").splitlines():
        if "generation queue: ticket" in line:
            out[line.split("generation queue: ticket", 1)[1].split()[1].rstrip(",")] += 1
    return out


async def soak(args, url: str, pid: int | None, log: Path | None, n_voxels: int, n_test: int) -> dict:
    from playwright.async_api import async_playwright

    stats = {"done": Counter(), "durations": defaultdict(list), "waits": [], "errors": [], "refused_rate_limit": 0,
             "closed_while_waiting": 0, "closed_not_seen_waiting": 0}
    stats = defaultdict(int, stats)
    rss: list = []
    stop = asyncio.Event()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            sessions = [Session(i, browser, url, args.steps, n_voxels, n_test, stats) for i in range(args.sessions)]
            t_open = time.perf_counter()
            await asyncio.gather(*(s.open() for s in sessions))  # the server's first page loads models: not timed
            print(f"{args.sessions} sessions open in {time.perf_counter() - t_open:.1f} s; the mix starts now")
            t0 = time.perf_counter()
            sampler = asyncio.create_task(sample_rss(pid, args.rss_every, rss, stop, t0))
            deadline = t0 + args.minutes * 60
            await asyncio.gather(*(s.run(deadline) for s in sessions))
            stop.set()
            await sampler
            wall = time.perf_counter() - t0
        finally:
            await browser.close()
    return {"stats": stats, "rss": rss, "wall_s": wall, "queue": queue_events(log)}


def report(args, res: dict) -> dict:
    st, rss = res["stats"], res["rss"]
    done = st["done"]
    print(f"\n{args.sessions} sessions for {args.minutes:g} min ({res['wall_s'] / 60:.1f} min wall, {args.steps} DDIM "
          f"steps): {sum(done.values())} actions completed, {len(st['errors'])} errors")
    for kind in ACTIONS:
        d = st["durations"][kind]
        print(f"  {kind:13s} {done[kind]:5d} done, duration p50 {pct(d, .5):6.2f} s, p95 {pct(d, .95):6.2f} s")
    w = st["waits"]
    print(f"  generation wait (click -> first progress): n={len(w)}, p50 {pct(w, .5):.2f} s, p95 {pct(w, .95):.2f} s, "
          f"max {max(w) if w else float('nan'):.2f} s")
    print(f"  tabs closed while queued: {st['closed_while_waiting']} (plus {st['closed_not_seen_waiting']} closed "
          f"before a wait was shown); uploads refused by the rate limit: {st['refused_rate_limit']}")
    q = res["queue"]
    if q:
        print(f"  server queue events: {q['drawn']} tickets drawn, {q['runs']} run, {q['withdrawn']} withdrawn "
              f"(closed tabs), {q['done']} done")
    for e in st["errors"][:20]:
        print(f"  ERROR {e}")
    out = {"sessions": args.sessions, "minutes": args.minutes, "steps": args.steps, "done": dict(done),
           "errors": st["errors"], "wait_p50_s": pct(w, .5), "wait_p95_s": pct(w, .95),
           "durations": {k: v for k, v in st["durations"].items()}, "queue": dict(q), "rss_mib": rss,
           "closed_while_waiting": st["closed_while_waiting"], "refused_rate_limit": st["refused_rate_limit"]}
    if rss:
        print("  server RSS (MiB) over time: " + ", ".join(f"{m:.1f} min {r:.0f}" for m, r in rss))
        warm = args.warmup if args.warmup is not None else min(2.0, args.minutes / 3)
        after = [r for m, r in rss if m >= warm]
        if after:
            mid = [r for m, r in rss if m >= args.minutes / 2] or after
            growth = (after[-1] - after[0]) / after[0]
            print(f"  RSS at start {rss[0][1]:.0f} MiB, after warm-up ({warm:g} min) {after[0]:.0f} MiB, at half time "
                  f"{mid[0]:.0f} MiB, at the end {after[-1]:.0f} MiB: growth after warm-up {100 * growth:+.1f}% "
                  f"(aim <= 15%), peak {max(r for _, r in rss):.0f} MiB")
            out.update(rss_growth_after_warmup=growth, warmup_min=warm)
    return out


def healthy(url: str) -> bool:
    """Whether the streamlit server at ``url`` answers its health check."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.read() == b"ok"
    except OSError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=8, help="browser sessions at once (default 8)")
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the mix runs (default 10)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM schedule the sessions set (default 50, the app's)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server started here")
    ap.add_argument("--url", default=None, help="soak this running server instead of starting one")
    ap.add_argument("--server-pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
    ap.add_argument("--rss-every", type=float, default=30.0, help="seconds between RSS samples (default 30)")
    ap.add_argument("--warmup", type=float, default=None, help="minutes of warm-up before RSS growth is measured")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if not Path(CHROMIUM).is_file():
        ap.error(f"Debian's chromium is required at {CHROMIUM} (`make browser` installs it)")

    from brain_diffuser_core.nsd import load_subject

    bundle, world, secs = build_demo_cache()
    subj = load_subject(world, 1, progress=False)
    print(f"demo cache ready in {secs:.1f} s; subject 1: {subj.n_voxels} voxels, {len(subj.test_image_ids)} test trials")
    proc, log = None, None
    if args.url:
        url, pid = args.url.rstrip("/"), args.server_pid
    else:
        url = f"http://127.0.0.1:{_free_port()}"
        log = Path(tempfile.mkdtemp(prefix="app-soak-")) / "server.log"
        proc = start_server(int(url.rsplit(":", 1)[1]), args.threads, log)
        pid = proc.pid
        deadline = time.time() + 120
        while not healthy(url):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the server did not start: " + log.read_text(errors="replace")[-2000:])
            time.sleep(0.3)
        print(f"server pid {pid} at {url}, log {log}")
    try:
        res = asyncio.run(soak(args, url, pid, log, subj.n_voxels, len(subj.test_image_ids)))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except Exception:
                proc.kill()
    out = report(args, res)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    return 1 if out["errors"] or not out["done"] else 0


if __name__ == "__main__":
    sys.exit(main())
