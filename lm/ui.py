"""Screenshots of the MLflow UI views that answer the study's three questions (README, 'Compare runs in MLflow'),
taken with headless Chromium driven over the DevTools protocol (aiohttp, already a dependency of DVC).

    lm ui --screenshots reports/mlflow        (make screenshots; needs a `chromium` binary)

1. best.png: every evaluate run, sorted by val/bpc, with its params, val/test bpc, val loss and family columns;
2. curves.png: the Shakespeare train runs' bits-per-character curves (train_bpc_est, val_bpc_est) against
   tokens_seen, each run in its own colour (tag mlflow.runColor, stages/mlflow_run.py);
3. diff.png: two runs compared (names-mlp and names-mlp-bn: the parameter rows that differ stand out).

The first two are MLflow shared views (the UI's Share button: an experiment tag holding the view's state, named by
the URL's viewStateShareKey), which keep what a plain URL cannot: the chosen columns, the chart search, the x-axis.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from lm.tracking import TrackingError, experiment_id, find_runs, share_view

WINDOW = (1600, 1000)
CLOSE_ASSISTANT = """(() => {
    const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
    if (b) b.click();
    return !!b;
})()"""
"""MLflow 3 opens an assistant panel over a third of the page: close it."""
PARAMETER_DIFF = """(() => {
    const headers = [...document.querySelectorAll('[role=button][aria-expanded=true]')];
    headers.filter(h => ['Visualizations', 'Run details'].includes(h.textContent.trim())).forEach(h => h.click());
    const toggle = document.querySelector('button[aria-label="Parameters - Show diff only"]');
    if (toggle) toggle.click();
    return !!toggle;
})()"""
"""The compare page opens on plots: show its parameters table, the differing rows only."""
ACTIONS = {"diff.png": (PARAMETER_DIFF,)}
"""What a view needs done after it opens: the compare page keeps no state in its URL, the other views none."""
BEST_COLUMNS = ["metrics.`val/bpc`", "metrics.`test/bpc`", "metrics.`val/loss`", "metrics.`params`", "tags.`family`"]
"""The runs table's columns for question 1 (MLflow's column keys), in place of its default Source, Models, Dataset."""
CURVE_CHARTS = "bpc_est"
"""Question 2's chart search: the train and val curves in bits per character (char and BPE runs on one scale)."""


def views(store: str, experiment: str, ui: str, corpus: str, pair: tuple[str, str] | None) -> dict[str, str]:
    """File name → URL of each view on the UI at `ui`: the evaluate runs by val/bpc, `corpus`'s train curves, the
    runs `pair` compared (raises ValueError if the store lacks them; None leaves that view out). The "" entry is the
    runs table, visited first (see below). Writes the first two views' shared view states to the experiment."""
    exp = experiment_id(store, experiment)
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} in {store}: run `make repro` first")
    page = f"{ui}/#/experiments/{exp}?workflowType=machine_learning"
    runs = f"{ui}/#/experiments/{exp}/runs?workflowType=machine_learning"
    q = urllib.parse.quote
    every = {"runsHiddenMode": "SHOW_ALL"}  # not only the first 10 runs (the UI's default)
    best = every | {"searchFilter": "attributes.run_name LIKE '%(evaluate)'", "orderByKey": "metrics.`val/bpc`",
                    "orderByAsc": True, "selectedColumns": BEST_COLUMNS}  # fmt: skip
    # Sorted by a metric only train runs have: the runs list flat, not folded under their collapsed parent.
    curves = every | {"searchFilter": f"tags.corpus = '{corpus}' AND attributes.run_name LIKE '%(train)'",
                      "orderByKey": "metrics.`val_bpc_est`", "orderByAsc": True, "chartsSearchFilter": CURVE_CHARTS,
                      "globalLineChartConfig": {"xAxisKey": "metric", "selectedXAxisMetricKey": "tokens_seen",
                                                "lineSmoothness": 0}}  # fmt: skip
    urls = {
        # The first visit only stores the ML workflow in the browser: switching to it reloads the page without
        # the other URL parameters, so the views come after it.
        "": page,
        # A shared view holds what a URL cannot (columns, chart search, x-axis); the URL must then carry no filter
        # or sort of its own, or MLflow ignores the shared view.
        "best.png": f"{runs}&viewStateShareKey=lm-best",
        "curves.png": f"{runs}&viewStateShareKey={q(f'lm-curves-{corpus}')}&compareRunsMode=CHART",
    }
    try:
        share_view(store, experiment, "lm-best", best)
        share_view(store, experiment, f"lm-curves-{corpus}", curves)
    except TrackingError:  # a store that takes no writes: filter, sort and view in the URL; columns by hand
        urls["best.png"] = _plain(runs, best)
        urls["curves.png"] = _plain(runs, curves) + "&compareRunsMode=CHART"
    if pair is not None:
        finished = {name: rid for rid, name in find_runs(store, experiment, "attributes.status = 'FINISHED'")}
        ids = [finished.get(f"{run} (train)") for run in pair]
        if None in ids:
            raise ValueError(f"the store has no finished train runs of {' and '.join(pair)} to compare")
        urls["diff.png"] = (f"{ui}/#/compare-runs?runs={q(json.dumps(ids))}&experiments={q(json.dumps([exp]))}"
                            "&workflowType=machine_learning")  # fmt: skip
    return urls


def _plain(runs: str, state: dict) -> str:
    """The runs table's URL with a view state's filter and sort as URL parameters (no shared view needed)."""
    q = urllib.parse.quote
    facets = {"searchFilter": state["searchFilter"], "orderByKey": state["orderByKey"], "orderByAsc": "true"}
    return runs + "".join(f"&{k}={q(v)}" for k, v in facets.items())


@dataclasses.dataclass
class Page:
    """What a view shows, read from the rendered page: `rows` the run names of the runs table in display order
    (the grid's row-index, not the DOM's order), `legends` the runs each chart draws, by metric (legend entries read
    "<run> (<metric>)"), `lines` the page's visible text."""

    rows: list[str]
    legends: dict[str, list[str]]
    lines: list[str]


READ_PAGE = """JSON.stringify({
    rows: [...document.querySelectorAll('[role=row][row-index]')].map(r => [Number(r.getAttribute('row-index')),
                                                                          r.innerText]),
    lines: document.body.innerText.split('\\n').map(l => l.trim()).filter(l => l)})"""
RUN_NAME = re.compile(r"^(\S+ \((?:train|evaluate|fetch|tokenize)\)|report)$")
LEGEND = re.compile(r"^(\S+ \((?:train|evaluate)\)) \(([^()]+)\)$")


def read_page(data: dict) -> Page:
    """A :class:`Page` from READ_PAGE's result."""
    by_index: dict[int, str] = {}
    for index, text in data["rows"]:
        name = next((line.strip() for line in text.splitlines() if RUN_NAME.match(line.strip())), None)
        if name is not None:
            by_index.setdefault(index, name)
    legends: dict[str, list[str]] = {}
    for line in data["lines"]:
        if m := LEGEND.match(line):
            legends.setdefault(m[2], []).append(m[1])
    return Page([by_index[i] for i in sorted(by_index)], legends, data["lines"])


@contextlib.contextmanager
def _browser(store: str, chromium: str) -> Iterator[tuple[str, int]]:
    """Headless Chromium on a free port, and `mlflow server` on `store` on another (a tracking server's URL is
    its own UI): (the UI's URL, the DevTools port)."""
    if shutil.which(chromium) is None:
        raise FileNotFoundError(f"{chromium} not found: install Chromium (Debian: apt-get install chromium)")
    port, devtools = _free_port(), _free_port()
    ui, server = store.rstrip("/"), None
    if not store.startswith(("http://", "https://")):
        ui = f"http://127.0.0.1:{port}"
        cmd = ["mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                  env=env)  # fmt: skip
    profile = tempfile.mkdtemp(prefix="lm-chromium-")
    browser = None
    try:
        wait_for(f"{ui}/health", 120)
        flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--remote-debugging-port={devtools}"]  # fmt: skip
        browser = subprocess.Popen(
            [chromium, *flags, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(f"http://127.0.0.1:{devtools}/json/version", 60)
        yield ui, devtools
    finally:
        for proc in (browser, server):
            if proc is not None:
                proc.terminate()
                proc.wait(20)
        shutil.rmtree(profile, ignore_errors=True)


def screenshots(
    store: str,
    experiment: str,
    out_dir: Path,
    *,
    corpus: str = "shakespeare",
    pair: tuple[str, str] = ("names-mlp", "names-mlp-bn"),
    chromium: str = "chromium",
    settle_s: float = 8.0,
) -> list[Path]:
    """Serve `store` with `mlflow server` on a free port, shoot every view into `out_dir`; return the files."""
    with _browser(store, chromium) as (ui, devtools):
        urls = views(store, experiment, ui, corpus, pair)
        out_dir.mkdir(parents=True, exist_ok=True)

        async def shoot(call, name: str) -> Path:
            shot = await call("Page.captureScreenshot", format="png")
            (out_dir / name).write_bytes(base64.b64decode(shot["data"]))
            return out_dir / name

        return list(asyncio.run(_visit(devtools, urls, settle_s, shoot)).values())


def read_views(
    store: str,
    experiment: str,
    *,
    corpus: str,
    pair: tuple[str, str],
    chromium: str = "chromium",
    settle_s: float = 8.0,
) -> dict[str, Page]:
    """Open every view of :func:`views` as the docs say (the same clicks as the screenshots) and read what it
    shows: what a test checks the links against. The first is opened as a fresh browser's first visit, as a link
    `lm ui` prints would be."""
    with _browser(store, chromium) as (ui, devtools):
        urls = views(store, experiment, ui, corpus, pair)
        del urls[""]

        async def read(call, name: str) -> Page:
            result = await call("Runtime.evaluate", expression=READ_PAGE, returnByValue=True)
            return read_page(json.loads(result["result"]["value"]))

        pages = asyncio.run(_visit(devtools, urls, settle_s, read))
        return {name.removesuffix(".png"): page for name, page in pages.items()}


async def _visit(devtools: int, urls: dict[str, str], settle_s: float, act) -> dict:
    """Open each URL in the browser's page, do the view's ACTIONS, then `act(call, name)`; its results by name."""
    import aiohttp

    with urllib.request.urlopen(f"http://127.0.0.1:{devtools}/json/list") as r:
        page = next(t for t in json.load(r) if t["type"] == "page")
    results = {}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws,
    ):
        counter = iter(range(1, 1_000_000))

        async def call(method: str, **params) -> dict:
            msg_id = next(counter)
            await ws.send_json({"id": msg_id, "method": method, "params": params})
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("id") == msg_id:
                    return data.get("result", {})
            raise RuntimeError("the browser closed the DevTools connection")

        for name, url in urls.items():
            await call("Page.navigate", url=url)
            await asyncio.sleep(settle_s)  # the single-page app fetches its runs and draws
            if not name:
                continue
            await call("Runtime.evaluate", expression=CLOSE_ASSISTANT)
            for action in ACTIONS.get(name, ()):
                await call("Runtime.evaluate", expression=action)
                await asyncio.sleep(2.0)
            results[name] = await act(call, name)
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout_s: float) -> None:
    """Return once `url` answers; TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s") from None
            time.sleep(0.5)
