"""The Dagster UI, in a real browser, on an instance that `forgeline demo` filled.

Once per module: `forgeline demo` (the lifecycle on batch digits-0001; then a model server with
traffic sampling, a client whose traffic shifts, the first window of shifted traffic ingested, the
labeled shifted batch ingested, the retrain the drift sensor requests, its promotion and the
rollout to that server) runs in a subprocess against a temporary FORGELINE_HOME / DAGSTER_HOME, then
`dagster-webserver` serves that instance on a free loopback port. Debian's chromium, driven headless
by Playwright, then reads what a user would: the catalog and the lineage graph (every lifecycle
asset materialized), the checks tab (the drift checks passed on the first batch and failed, with
ERROR severity, on the shifted one and on a `serving-*` window of traffic), a materialization's
metadata, the promotion (promoted_model's version and previous) and the rollout (model_rollout's
time to ready per server).

Only a missing chromium skips this test (`make system-deps` installs it); anything the UI fails to
show fails it. Screenshots go to $FORGELINE_SCREENSHOT_DIR, else to the test's tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BATCH = "digits-0001"
# Every stage of `lifecycle`; the two ingestion assets are partitioned by batch.
LIFECYCLE_ASSETS = ["raw_shards", "raw_table", "preprocessed", "trained_model", "exported_model",
                    "quantized_model", "compile_artifacts", "promoted_model", "shm_prewarm", "model_rollout",
                    "served_models"]
PARTITIONED = {"raw_shards", "raw_table"}
# Drift checks: passed on digits-0001, failed (ERROR) on a window of shifted serving traffic and on the
# labeled shifted batch `forgeline demo` ingests next.
WINDOW = re.compile(r"^serving-digits-\d{8}T\d{6}Z-[0-9a-f]+-\d+$")
DRIFT_CHECKS = [("raw_table", "table_drift"), ("raw_shards", "image_drift"), ("raw_shards", "prediction_drift")]

DEMO_TIMEOUT_S = 600
SERVER_START_TIMEOUT_S = 120
UI_TIMEOUT_MS = 60_000  # per wait: the webserver answers slowly while 2 cores are busy
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
# Inherited settings that would point the demo away from the temporary instance.
_FOREIGN_ENV = re.compile(r"^(FORGELINE_|AWS_|DAGSTER_)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"(no log: {e})"


def _chromium() -> str:
    """Path of Debian's chromium; installs it with apt when running as root, else skips."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and could not be installed "
                    "(`make system-deps`, or `sudo apt-get install chromium`)")
    return found


def _location_status(base: str) -> tuple[str, str]:
    """(loadStatus, error message or "") of the forgeline code location, via GraphQL."""
    query = ("{ workspaceOrError { __typename ... on PythonError { message } ... on Workspace { locationEntries "
             "{ name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }")
    req = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        ws = json.load(resp)["data"]["workspaceOrError"]
    if ws["__typename"] != "Workspace":
        return "ERROR", ws.get("message", ws["__typename"])
    for entry in ws["locationEntries"]:
        if entry["name"] == "forgeline":
            loaded = entry["locationOrLoadError"] or {}
            return entry["loadStatus"], loaded.get("message", "")
    return "MISSING", ""


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's whole process group (webserver and its code server)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def chromium_path() -> str:
    return _chromium()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """`forgeline demo` on a fresh temporary instance: its environment, log and the production
    alias it left (the retrained version, and the lifecycle's as ``previous``)."""
    tmp = tmp_path_factory.mktemp("ui")
    env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}
    env.update(FORGELINE_HOME=str(tmp / "home"), DAGSTER_HOME=str(tmp / "home" / "dagster_home"),
               FORGELINE_SHM_ROOT=str(tmp / "shm"), TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"),
               PYTHONUNBUFFERED="1", COLUMNS="160")

    demo_log = tmp / "demo.log"
    t0 = time.monotonic()
    with open(demo_log, "wb") as log:
        try:
            demo = subprocess.run([str(BIN / "forgeline"), "demo", "--batch", BATCH], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=DEMO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`forgeline demo` ran over {DEMO_TIMEOUT_S}s; log tail:\n{_tail(demo_log)}")
    # exit status 0: the swap happened and the client saw no failed request
    assert demo.returncode == 0, f"`forgeline demo` failed ({demo.returncode}); log tail:\n{_tail(demo_log)}"
    print(f"\nforgeline demo: {time.monotonic() - t0:.0f}s (log {demo_log})")
    # The demo made the instance through ensure_instance_home(): the webserver reads the same dagster.yaml.
    assert "enabled: false" in (Path(env["DAGSTER_HOME"]) / "dagster.yaml").read_text()
    alias = json.loads((tmp / "home" / "storage" / "models" / "digits" / "production").read_text())
    assert alias["previous"], f"the demo promoted only once: {alias}"
    served = re.search(r"FORGELINE_SERVE_URLS=http://(127\.0\.0\.1:\d+)", demo_log.read_text())
    assert served, f"the demo's rollout named no server; log tail:\n{_tail(demo_log)}"
    return {"env": env, "tmp": tmp, "log": demo_log, "production": alias["version"], "previous": alias["previous"],
            "server": served.group(1)}


@pytest.fixture(scope="module")
def ui(chromium_path, demo) -> Iterator[str]:
    """Base URL of a dagster-webserver on the instance that `forgeline demo` materialized."""
    env, tmp = demo["env"], demo["tmp"]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = tmp / "webserver.log"
    t0 = time.monotonic()
    with open(server_log, "wb") as log:
        proc = subprocess.Popen([str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        status, error = "NOT ANSWERING", ""
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dagster-webserver exited ({proc.returncode}); log tail:\n{_tail(server_log)}")
            try:
                urllib.request.urlopen(f"{base}/server_info", timeout=2).close()
                status, error = _location_status(base)
            except (OSError, KeyError, ValueError):
                pass
            if status == "LOADED" or error:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"dagster-webserver on {base} not ready after {SERVER_START_TIMEOUT_S}s "
                            f"(code location: {status}); log tail:\n{_tail(server_log)}")
            time.sleep(0.5)
        assert not error, f"code location forgeline failed to load in the webserver:\n{error}"
        print(f"dagster-webserver: ready in {time.monotonic() - t0:.0f}s on {base} (log {server_log})")
        yield base
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, ui):
    context = browser.new_context(base_url=ui, viewport={"width": 1600, "height": 1100})
    context.set_default_timeout(UI_TIMEOUT_MS)
    pg = context.new_page()
    # A fresh instance greets the first visitor with a newsletter dialog over everything: dismiss it
    # whenever it shows up.
    pg.add_locator_handler(pg.get_by_text("Join the Dagster community"),
                           lambda: pg.get_by_role("button", name="Skip").click())
    try:
        yield pg
    finally:
        context.close()


@pytest.fixture
def shoot(page, tmp_path) -> Callable[[str], Path]:
    """``shoot(name)``: a full-page PNG of the current page; prints its path."""
    out = Path(os.environ.get("FORGELINE_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)

    def save(name: str) -> Path:
        path = out / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    return save


def _open(page, path: str) -> None:
    page.goto(path, wait_until="domcontentloaded")


def test_catalog_and_lineage_show_every_lifecycle_asset_materialized(page, shoot):
    from playwright.sync_api import expect

    _open(page, "/assets")
    for name in LIFECYCLE_ASSETS:
        link = page.locator(f'a[href="/assets/{name}"]').first
        expect(link).to_be_visible()
        row = page.locator('[class*="VirtualizedTable_row"]').filter(has=page.locator(f'a[href="/assets/{name}"]'))
        expect(row).to_have_count(1)
        if name in PARTITIONED:
            # A partitioned asset's status cell reads "All" when every partition is materialized.
            expect(row.get_by_text("All", exact=True)).to_be_visible()
            expect(row.get_by_role("img", name="partition_success").first).to_be_visible()
            expect(row).to_contain_text(re.compile(r"\d+ partitions?"))
        else:
            expect(row).to_contain_text("Materialized")
    shoot("catalog")

    for name in sorted(PARTITIONED):
        _open(page, f"/assets/{name}?view=partitions")
        expect(page.get_by_text(re.compile(r"^Materialized \([1-9]\d*\)$"))).to_be_visible()
        expect(page.get_by_text("Missing (0)", exact=True)).to_be_visible()
        expect(page.get_by_text("Failed (0)", exact=True)).to_be_visible()
        expect(page.get_by_text(BATCH, exact=True).first).to_be_visible()
        shoot(f"{name}-partitions")

    _open(page, "/asset-groups")  # the global lineage graph, groups collapsed
    expect(page.get_by_text("Global asset lineage")).to_be_visible()
    expect(page.get_by_text("ingest", exact=True).last).to_be_visible()
    page.wait_for_load_state("networkidle")
    if not page.get_by_text("raw_shards", exact=True).is_visible():
        page.keyboard.press("Alt+e")  # the graph's "Expand all groups" shortcut
    for name in LIFECYCLE_ASSETS:
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    shoot("lineage")


def _check_history(page, asset: str, check: str) -> list[dict]:
    """Every evaluation of ``asset:check`` on its Execution history tab, newest first: its result
    ("Passed"/"Failed"), the result's icon (severity) and its partition (None for an unpartitioned check)."""
    from playwright.sync_api import expect

    _open(page, f"/assets/{asset}?view=checks&checkDetail={check}")
    expect(page.get_by_text(re.compile(r"^Checks \(\d+\)$"))).to_be_visible()
    expect(page.get_by_text(check, exact=True).first).to_be_visible()
    page.get_by_role("tab", name="Execution history").click()
    expect(page.get_by_role("columnheader", name="Evaluation result")).to_be_visible()
    results = page.get_by_role("row").filter(has=page.get_by_role("cell"))
    expect(results.first).to_be_visible()
    columns = [h.inner_text().strip() for h in page.get_by_role("columnheader").all()]
    out = []
    for row in results.all():
        cells = [c.inner_text().strip() for c in row.get_by_role("cell").all()]
        icon = row.get_by_role("cell").first.get_by_role("img")
        out.append({"result": cells[0], "icon": icon.first.get_attribute("aria-label") if icon.count() else "",
                    "partition": cells[columns.index("Partition")] if "Partition" in columns else None})
    return out


def test_checks_tab_shows_drift_checks_passed_then_failed(page, shoot):
    from playwright.sync_api import expect

    for asset, check in DRIFT_CHECKS:
        history = _check_history(page, asset, check)
        shoot(f"{asset}-{check}-history")
        first = [h for h in history if h["partition"] == BATCH]
        shifted = [h for h in history if h["partition"] not in (BATCH, None)]
        assert first and all(h["result"] == "Passed" for h in first), f"{asset}:{check} on {BATCH}: {history}"
        assert shifted and shifted[0] == history[0], f"{asset}:{check}: no newer evaluation on another batch: {history}"
        # ERROR severity draws a red "cancel" icon; a failed WARN check draws "warning_outline".
        assert history[0]["result"] == "Failed" and history[0]["icon"] == "cancel", \
            f"{asset}:{check} on the shifted batch {history[0]['partition']}: {history}"

        # The check's own Overview: its latest execution is that ERROR failure, on the shifted batch.
        page.get_by_role("tab", name="Overview").last.click()
        expect(page.get_by_text("Latest execution")).to_be_visible()
        latest = page.get_by_text("Evaluation result", exact=True).locator("xpath=..")
        expect(latest).to_contain_text("Failed")
        expect(latest.get_by_role("img").first).to_have_attribute("aria-label", "cancel")
        expect(page.get_by_text(history[0]["partition"], exact=True).first).to_be_visible()
        expect(page.get_by_text("drift_share", exact=True).first).to_be_visible()  # the check's metadata
        shoot(f"{asset}-{check}-latest")

        # Partitioned checks have a Partitions tab with a status per batch.
        page.get_by_role("tab", name="Partitions").last.click()
        expect(page.get_by_text(re.compile(r"^Passed \([1-9]\d*\)$"))).to_be_visible()
        expect(page.get_by_text(re.compile(r"^Failed \([1-9]\d*\)$"))).to_be_visible()
        expect(page.get_by_text("Execution Failed (0)", exact=True)).to_be_visible()
        shoot(f"{asset}-{check}-partitions")


def test_materialization_metadata_is_visible(page, shoot):
    from playwright.sync_api import expect

    _open(page, "/assets/raw_table?view=events")
    event = page.get_by_text(BATCH, exact=True).first
    expect(event).to_be_visible()
    event.click()
    expect(page.get_by_text(re.compile(rf"Partition\s+{BATCH}\s+materialized in run"))).to_be_visible()
    # sklearn's digits: 1797 rows, split train/val/test.
    rows = page.get_by_role("row").filter(has=page.get_by_role("cell", name="rows", exact=True))
    expect(rows).to_contain_text("1797")
    splits = page.get_by_role("row").filter(has=page.get_by_role("cell", name="splits", exact=True))
    expect(splits).to_contain_text('"train"')
    shoot("raw_table-materialization")

    _open(page, "/assets/trained_model")
    expect(page.get_by_text("Latest materialization")).to_be_visible()
    accuracy = page.get_by_role("row").filter(has=page.get_by_role("cell", name="test_accuracy", exact=True))
    expect(accuracy).to_contain_text(re.compile(r"0\.9\d*"))
    shoot("trained_model-overview")


def test_drift_checks_failed_on_a_window_of_serving_traffic(page, shoot):
    """The window of shifted traffic the demo's server sampled is a `serving-*` partition whose drift
    checks failed at ERROR: the serving side of the loop, visible where every other check is."""
    for asset, check in DRIFT_CHECKS:
        history = _check_history(page, asset, check)
        windows = [h for h in history if WINDOW.match(h["partition"] or "")]
        assert windows, f"{asset}:{check}: no evaluation on a serving window: {history}"
        assert all(h["result"] == "Failed" and h["icon"] == "cancel" for h in windows), \
            f"{asset}:{check} on the serving window: {windows}"
        shoot(f"{asset}-{check}-serving-window")


def _metadata_row(page, key: str):
    """The row of the latest materialization's metadata table whose key cell is ``key``."""
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=key, exact=True))


def test_promotion_and_rollout_are_visible(page, shoot, demo):
    from playwright.sync_api import expect

    # promoted_model: the retrained version is production, the lifecycle's is its previous
    _open(page, "/assets/promoted_model")
    expect(page.get_by_text("Latest materialization")).to_be_visible()
    expect(_metadata_row(page, "version")).to_contain_text(demo["production"])
    expect(_metadata_row(page, "previous")).to_contain_text(demo["previous"])
    shoot("promoted_model-overview")

    # model_rollout: the demo server served the promoted version, after so many seconds
    _open(page, "/assets/model_rollout")
    expect(page.get_by_text("Latest materialization")).to_be_visible()
    expect(_metadata_row(page, "version")).to_contain_text(demo["production"])
    expect(_metadata_row(page, "servers")).to_contain_text("1")
    per_server = _metadata_row(page, f"time_to_ready_s/{demo['server']}")  # the demo's server, host:port
    expect(per_server).to_have_count(1)
    expect(per_server).to_contain_text(re.compile(r"\d+\.\d+"))
    shoot("model_rollout-overview")
