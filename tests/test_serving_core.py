"""The serving core (pipeline.serving.registry) against real published versions: tiny DigitsCNN
versions exported into a LocalStorage, promoted with pipeline.promotion, served on the CPU.
Every answer is compared with the eager module it came from."""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest
import torch

from pipeline import export, promotion
from pipeline.models import DigitsCNN
from pipeline.serving.batching import DynamicBatcher, QueueFull
from pipeline.serving import InvalidInput, ModelNotFound, ModelRegistry, ServeConfig, Unavailable
from pipeline.shm_tier import ShmTier
from pipeline.storage import LocalStorage

WIDTH = 4
SHAPE = (1, 28, 28)


def make_module(seed: int, width: int = WIDTH) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = DigitsCNN(width=width)
    with torch.no_grad():  # BatchNorm statistics that differ per version
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def publish(store, name: str, version: str, seed: int, *, golden_shift: float = 0.0,
            width: int = WIDTH) -> torch.nn.Module:
    """Export a DigitsCNN version with golden outputs (``golden_shift`` makes them wrong)."""
    m = make_module(seed, width)
    golden = export.golden_outputs(m, export.golden_input(SHAPE))
    if golden_shift:
        golden["output"] = golden["output"] + golden_shift
    export.export(export.from_module(m, architecture="digits_cnn", model_kwargs={"width": width}), store, name,
                  version, golden=golden)
    return m


def weight_size(m: torch.nn.Module) -> int:
    """Bytes of a module's state dict: what the server holds resident for it."""
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def eager(m: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE), dtype=np.float32)


def config(**kw) -> ServeConfig:
    base = dict(poll_s=0.05, max_queue_delay_ms=1.0, load_timeout_s=30.0)
    return ServeConfig(**{**base, **kw})


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 50))


@pytest.fixture
def store(tmp_path):
    return LocalStorage(tmp_path / "store")


async def a_evicted_by_b(store, size: int, **kw) -> tuple[ModelRegistry, np.ndarray]:
    """A started registry with a budget for one and a half models of ``size`` bytes that served
    "a", then "b" (which evicted "a"); and the batch it used."""
    reg = ModelRegistry(store, config(budget_bytes=int(size * 1.5), **kw))
    await reg.start()
    x = batch(2)
    await reg.infer("a", None, {"input": x})
    await reg.infer("b", None, {"input": x})  # evicts a
    assert not reg.model_ready("a")
    return reg, x


async def wait_until(pred, timeout: float = 5.0, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


def test_infer_matches_eager_and_validates_inputs(store):
    v1 = publish(store, "digits", "v1", 1)
    v2 = publish(store, "digits", "v2", 2)
    promotion.promote(store, "digits", "v1")

    async def main():
        reg = ModelRegistry(store, config())
        await reg.start()
        assert reg.live() and reg.ready()
        assert [r["name"] for r in reg.index()] == ["digits"]
        assert not reg.model_ready("digits")
        x = batch(5)
        out = await reg.infer("digits", None, {"input": x})
        np.testing.assert_allclose(out["output"], eager(v1, x), atol=1e-5)
        assert reg.model_ready("digits")
        md = reg.metadata("digits")
        assert md["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        assert md["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
        p = md["parameters"]
        assert (p["production"], p["serving"], p["state"], p["last_error"]) == ("v1", "v1", "READY", None)
        assert p["golden"]["checked"] and p["golden"]["max_abs_diff"] <= 1e-4
        assert reg.index() == [{"name": "digits", "version": "v1", "state": "READY", "reason": ""}]

        # a specific version that is not resident loads beside the serving one
        out2 = await reg.infer("digits", "v2", {"input": x})
        np.testing.assert_allclose(out2["output"], eager(v2, x), atol=1e-5)
        assert reg.model_ready("digits", "v2") and reg.metadata("digits")["parameters"]["serving"] == "v1"

        for bad, words in [
            ({"images": x}, "expected exactly one input 'input' FP32 [-1, 1, 28, 28]"),
            ({"input": x.astype(np.float64)}, "is FP64, expected 'input' FP32"),
            ({"input": x[:, :, :14]}, "has shape [5, 1, 14, 28]"),
            ({"input": x[0]}, "has shape [1, 28, 28]"),
            ({"input": batch(33)}, "exceeds max_batch_size 32"),
        ]:
            with pytest.raises(InvalidInput, match=None) as e:
                await reg.infer("digits", None, bad)
            assert words in str(e.value) and e.value.status == 400
        with pytest.raises(ModelNotFound):
            await reg.infer("nope", None, {"input": x})
        with pytest.raises(ModelNotFound):
            await reg.infer("digits", "v9", {"input": x})
        with pytest.raises(ModelNotFound):
            reg.metadata("nope")
        # readiness of what does not exist is a 404, as the metadata says, not "not ready yet"
        for name, version in [("nope", None), ("digits", "v9")]:
            with pytest.raises(ModelNotFound):
                reg.model_ready(name, version)
        assert reg.metrics.value("requests_total", model="digits", version="v1", result="invalid") == 5
        assert b"forgeline_serving_request_seconds_bucket" in reg.metrics.render()
        assert reg.metrics.latency("digits")["count"] == 2
        await reg.stop()
        assert not reg.live()

    run(main())


def roles(reg: ModelRegistry, model: str = "digits") -> set[tuple[str, str]]:
    """``(version, role)`` of the model in the server's ``version_info`` metric, as scraped."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(reg.metrics.render().decode())
    return {(s.labels["version"], s.labels["role"]) for fam in families
            if fam.name == "forgeline_serving_version_info" for s in fam.samples if s.labels["model"] == model}


def test_hot_swap_under_load_and_instant_rollback(store):
    mods = {"v1": publish(store, "digits", "v1", 1), "v2": publish(store, "digits", "v2", 2)}
    promotion.promote(store, "digits", "v1")

    async def main():
        reg = ModelRegistry(store, config(max_queue_delay_ms=2.0))
        await reg.start()
        await reg.load("digits")
        answers: list[tuple[np.ndarray, np.ndarray, str]] = []
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def client(seed: int):
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                x = batch(int(rng.integers(1, 5)), int(rng.integers(1 << 30)))
                try:
                    out = await reg.infer("digits", None, {"input": x})
                    answers.append((x, out["output"], out.version))
                except BaseException as e:  # noqa: BLE001
                    failures.append(e)

        scrapes: list[frozenset] = []

        async def scraper():  # /metrics renders on the event loop, as here: never mid-swap
            while not stop.is_set():
                scrapes.append(frozenset(roles(reg)))
                await asyncio.sleep(0.002)

        clients = [asyncio.create_task(client(i)) for i in range(6)] + [asyncio.create_task(scraper())]
        await wait_until(lambda: len(answers) > 30)
        promotion.promote(store, "digits", "v2")
        t0 = time.monotonic()
        await wait_until(lambda: reg.metadata("digits")["parameters"]["serving"] == "v2", timeout=10)
        swapped_after = time.monotonic() - t0
        n_at_swap = len(answers)
        await wait_until(lambda: len(answers) > n_at_swap + 30)
        stop.set()
        await asyncio.gather(*clients)

        assert failures == []
        seen = []
        for x, y, served in answers:
            match = [v for v, m in mods.items() if np.allclose(y, eager(m, x), atol=1e-5)]
            assert len(match) == 1, "an answer matches neither version"
            assert served == match[0], "the answer names a version that did not compute it"
            seen.append(match[0])
        assert "v1" in seen and "v2" in seen
        # concurrent requests were batched: fewer forwards than requests
        assert 0 < reg.metrics.value("batch_size_count", model="digits") < len(answers)
        assert seen[-10:] == ["v2"] * 10
        assert swapped_after < 40 * reg.config.poll_s + 2  # a few poll periods plus the (tiny) load
        p = reg.metadata("digits")["parameters"]
        assert p["previous"] == "v1" and p["last_swap"]["from"] == "v1" and p["last_swap"]["loaded"]
        assert roles(reg) == {("v2", "serving"), ("v1", "previous")}
        before, after = frozenset({("v1", "serving")}), frozenset({("v2", "serving"), ("v1", "previous")})
        assert set(scrapes) == {before, after}, "a scrape saw the swap half done"
        assert reg.metrics.value("swaps_total", model="digits", result="ok") == 1
        loads = reg.metrics.value("loads_total", model="digits", result="ok")
        assert loads == 2

        # rollback: the previous version is still resident -> swapped back without a load
        promotion.rollback(store, "digits")
        await wait_until(lambda: reg.metadata("digits")["parameters"]["serving"] == "v1")
        assert reg.metrics.value("loads_total", model="digits", result="ok") == loads
        assert reg.metadata("digits")["parameters"]["last_swap"]["loaded"] is False
        assert roles(reg) == {("v1", "serving"), ("v2", "previous")}
        x = batch(3, 7)
        np.testing.assert_allclose((await reg.infer("digits", None, {"input": x}))["output"],
                                   eager(mods["v1"], x), atol=1e-5)
        await reg.stop()

    run(main())


def test_golden_mismatch_is_refused_and_old_version_keeps_serving(store):
    v1 = publish(store, "digits", "v1", 1)
    publish(store, "digits", "v2", 2, golden_shift=0.5)  # recorded outputs the weights do not produce
    promotion.promote(store, "digits", "v1")

    async def main():
        reg = ModelRegistry(store, config())
        await reg.start()
        x = batch(4)
        await reg.infer("digits", None, {"input": x})
        promotion.promote(store, "digits", "v2")
        await wait_until(lambda: reg.metadata("digits")["parameters"]["last_error"] is not None)
        p = reg.metadata("digits")["parameters"]
        assert p["serving"] == "v1" and p["production"] == "v2" and p["state"] == "READY"
        assert "v2" in p["last_error"] and "golden check failed" in p["last_error"]
        assert reg.metrics.value("swaps_total", model="digits", result="failed") == 1
        assert reg.metrics.value("loads_total", model="digits", result="failed") == 1
        np.testing.assert_allclose((await reg.infer("digits", None, {"input": x}))["output"], eager(v1, x), atol=1e-5)
        await asyncio.sleep(10 * reg.config.poll_s)  # the watcher does not retry a failed version
        assert reg.metrics.value("loads_total", model="digits", result="failed") == 1
        with pytest.raises(Unavailable, match="golden check failed"):  # an explicit load retries, and says why
            await reg.load("digits")
        assert reg.model_ready("digits") and not reg.model_ready("digits", "v2")
        await reg.stop()

        # a model whose only version fails: requests say why, and do not reload it on every request
        publish(store, "broken", "v1", 3, golden_shift=0.5)
        reg = ModelRegistry(store, config())
        await reg.start()
        for _ in range(3):
            with pytest.raises(Unavailable, match="golden check failed") as e:
                await reg.infer("broken", None, {"input": x})
            assert e.value.retry_after_s >= 1
        assert reg.metrics.value("loads_total", model="broken", result="failed") == 1
        row = [r for r in reg.index() if r["name"] == "broken"][0]
        assert row["state"] == "UNAVAILABLE" and "golden check failed" in row["reason"]
        await reg.stop()

    run(main())


def test_dynamic_batcher_triton_semantics():
    calls: list[int] = []

    def forward(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape[0])
        return x * 2

    async def main():
        b = DynamicBatcher(forward, max_batch_size=4, max_queue_delay_ms=50, queue_limit=16)
        xs = [np.full((1, 2), i, np.float32) for i in range(10)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        assert all((o == x * 2).all() for o, x in zip(outs, xs))  # each caller gets its own rows back
        assert calls == [4, 4, 2]  # full batches go at once, the rest after the delay
        calls.clear()
        t0 = time.monotonic()
        await b.submit(np.zeros((3, 2), np.float32))  # alone: waits max_queue_delay_ms, then runs
        assert 0.04 <= time.monotonic() - t0 < 1 and calls == [3]
        calls.clear()
        # a request never splits: 3 + 3 rows do not fit in 4 -> two forwards
        await asyncio.gather(b.submit(np.zeros((3, 2), np.float32)), b.submit(np.zeros((3, 2), np.float32)))
        assert calls == [3, 3]
        small = DynamicBatcher(forward, max_batch_size=4, max_queue_delay_ms=100, queue_limit=2)
        tasks = [asyncio.create_task(small.submit(np.zeros((1, 2), np.float32))) for _ in range(3)]
        res = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(r, QueueFull) for r in res) == 1
        await b.close()
        await small.close()

    run(main())


def test_lru_budget_evicts_idle_models_and_reloads(store):
    mods = {n: publish(store, n, "v1", i) for i, n in enumerate(["a", "b", "c"])}
    size = weight_size(mods["a"])

    async def main():
        reg = ModelRegistry(store, config(budget_bytes=int(size * 2.5)))
        await reg.start()
        x = batch(2)
        for name in ["a", "b", "c"] * 2:
            out = await reg.infer(name, None, {"input": x})
            np.testing.assert_allclose(out["output"], eager(mods[name], x), atol=1e-5)
            assert reg.metrics.value("resident_models") <= 2
            assert reg._used() <= int(size * 2.5)
        loads = sum(reg.metrics.value("loads_total", model=n, result="ok") for n in "abc")
        evictions = sum(reg.metrics.value("evictions_total", model=n, reason="lru") for n in "abc")
        assert loads == 6 and evictions == 4
        rows = {r["name"]: r for r in reg.index()}
        assert rows["a"]["state"] == "UNAVAILABLE" and "evicted (LRU)" in rows["a"]["reason"]
        assert rows["b"]["state"] == rows["c"]["state"] == "READY"
        # an eager re-load of bytes that passed the full golden check here (sha256-verified again)
        # does not run it again; the answers above prove the re-used module shells hold the
        # right weights (a, b and c share one architecture)
        assert reg.metadata("c")["parameters"]["golden"] == {"checked": True, "rows": 0, "reused": True}
        # a model with a request in flight is never evicted: hold "b" (the LRU one) busy while "a" loads
        batcher = reg._models["b"].resident().batcher
        run_b = batcher.run
        batcher.run = lambda x: (time.sleep(0.5), run_b(x))[1]
        busy = asyncio.create_task(reg.infer("b", None, {"input": x}))
        await asyncio.sleep(0.05)
        await reg.infer("a", None, {"input": x})
        await busy
        assert reg.model_ready("a") and reg.model_ready("b") and not reg.model_ready("c")
        # room for one copy of "a": its other version can never load beside the serving one, and
        # says so at once instead of waiting out load_timeout_s
        one = ModelRegistry(store, config(budget_bytes=int(size * 1.5)))
        await one.start()
        await one.infer("a", None, {"input": x})
        publish(store, "a", "v2", 7)
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=r"a/v2 needs \d+ bytes beside a/v1 \(\d+ bytes\), which serves until "
                                              r"it is ready: the budget \(\d+\) cannot hold both; a hot swap needs"):
            await one.infer("a", "v2", {"input": x})
        assert time.monotonic() - t0 < 5 and one.model_ready("a")  # nothing waited; v1 still serves
        await one.stop()
        # too small for even one model
        small = ModelRegistry(store, config(budget_bytes=size // 2))
        await small.start()
        with pytest.raises(Unavailable, match="more than the whole budget"):
            await small.infer("a", None, {"input": x})
        await small.stop()
        await reg.stop()

    run(main())


def test_metadata_without_golden_outputs_names_only_what_the_manifest_says(store):
    """A version without golden outputs: its specs come from the architecture (its config, else its
    constructor's defaults); a manifest naming no known architecture gets -1 (unknown), not another
    model's shapes, and its state says why it cannot load."""
    m = make_module(1)
    export.export(export.from_module(m, architecture="digits_cnn", model_kwargs={"width": WIDTH}), store, "d", "v1")
    export.export({"w": torch.ones(4)}, store, "bare", "v1")
    export.export({"w": torch.ones(4)}, store, "r", "v1",  # the specs need only the config
                  config={"architecture": "resnet50", "kwargs": {"num_classes": 7}})
    for name in ("d", "bare", "r"):
        promotion.promote(store, name, "v1")

    async def main():
        reg = ModelRegistry(store, config())
        await reg.start()
        shapes = {n: (reg.metadata(n)["inputs"][0]["shape"], reg.metadata(n)["outputs"][0]["shape"])
                  for n in ("d", "bare", "r")}
        assert shapes == {"d": ([-1, 1, -1, -1], [-1, 10]), "bare": ([-1, -1, -1, -1], [-1, -1]),
                          "r": ([-1, 3, -1, -1], [-1, 7])}
        with pytest.raises(Unavailable, match="names no architecture"):
            await reg.infer("bare", None, {"input": batch(1)})
        await reg.stop()

    run(main())


def _v1_in_production_v2_published(store) -> tuple[dict, str, bytes]:
    """digits v1 (promoted) and v2 (newer, not promoted): ``(modules, alias key, the alias's bytes)``."""
    mods = {"v1": publish(store, "digits", "v1", 1), "v2": publish(store, "digits", "v2", 2)}
    promotion.promote(store, "digits", "v1")
    alias = export.version_prefix("digits", "production")
    return mods, alias, store.read(alias)


def test_a_damaged_alias_keeps_the_served_version_until_it_is_repaired(store, caplog):
    """The production alias damaged outside forgeline: the server keeps answering with what it
    serves, logs one warning naming the file (again only if it changes, or after 5 minutes) and counts
    every failed read; once the alias reads again, it swaps."""
    mods, alias, good = _v1_in_production_v2_published(store)

    async def main():
        reg = ModelRegistry(store, config())
        await reg.start()
        x = batch(2)
        assert np.allclose((await reg.infer("digits", None, {"input": x}))["output"], eager(mods["v1"], x), atol=1e-5)
        await wait_until(lambda: reg.metrics.value("alias_reads_total", model="digits", result="ok") > 0)
        assert reg.metadata("digits")["parameters"]["alias_error"] is None
        store.write_atomic(alias, good[: len(good) // 2])
        await wait_until(lambda: reg.metrics.value("alias_reads_total", model="digits", result="failed") >= 3)
        last_read = reg.metrics.value("alias_read_timestamp_seconds", model="digits")
        out = await reg.infer("digits", None, {"input": x})
        assert out.version == "v1" and np.allclose(out["output"], eager(mods["v1"], x), atol=1e-5)
        warned = [r.getMessage() for r in caplog.records if "cannot read the production alias" in r.getMessage()]
        assert len(warned) == 1, warned  # said once, not at every poll (the failures are counted)
        assert store.uri(alias) in warned[0] and "corrupt or truncated" in warned[0]
        # what monitoring sees: the error in the metadata, the failures counted, the last good read's time held
        error = reg.metadata("digits")["parameters"]["alias_error"]
        assert store.uri(alias) in error and "corrupt or truncated" in error
        assert reg.metrics.value("alias_read_timestamp_seconds", model="digits") == last_read
        store.write_atomic(alias, good)
        promotion.promote(store, "digits", "v2")
        await wait_until(lambda: reg.metadata("digits")["parameters"]["serving"] == "v2", timeout=10)
        assert reg.metadata("digits")["parameters"]["alias_error"] is None
        assert reg.metrics.value("alias_read_timestamp_seconds", model="digits") > last_read
        await reg.stop()

    with caplog.at_level("WARNING"):
        run(main())


def test_a_pinned_version_loading_beside_a_swap_is_not_dropped_before_its_request_takes_it(store):
    """A request for a non-serving version while the model's serving version comes back (both
    loading at once): the swap's clean-up of versions that are neither serving nor previous once
    dropped the pinned one between its load and its request ('was unloaded before it could
    answer', with nothing unloaded); here every such request is answered by its version."""
    _v1_in_production_v2_published(store)

    async def main():
        reg = ModelRegistry(store, config(keep_previous=False))
        await reg.start()
        x = batch(1)
        await reg.infer("digits", None, {"input": x})
        for _ in range(25):
            m = reg._models["digits"]
            for v in list(m.versions):  # out of memory, as the LRU leaves it
                reg._evict_now(m, v, "test")
            plain, pinned = await asyncio.gather(reg.infer("digits", None, {"input": x}),
                                                 reg.infer("digits", "v2", {"input": x}))
            assert (plain.version, pinned.version) == ("v1", "v2")
        await reg.stop()

    run(main())


def test_a_model_unloaded_while_a_request_waits_for_it_is_not_loaded_again(store):
    """Unload while a request waits for the model's load: the request is told the model is
    unloaded, and nothing loads it again for that request (it used to, up to three times)."""
    _v1_in_production_v2_published(store)

    async def main():
        reg = ModelRegistry(store, config())
        await reg.start()
        loads = 0
        real = reg._load_fn

        def counting(*a, **k):
            nonlocal loads
            loads += 1
            time.sleep(0.05)  # a load takes a while: the unload comes in meanwhile
            return real(*a, **k)

        reg._load_fn = counting
        for _ in range(5):
            await reg.unload("digits")
            await reg.load("digits")
            m = reg._models["digits"]
            for v in list(m.versions):
                reg._evict_now(m, v, "test")
            before = loads
            request = asyncio.ensure_future(reg.infer("digits", None, {"input": batch(1)}))
            await asyncio.sleep(0.01)
            await reg.unload("digits")
            with pytest.raises(Unavailable, match="digits is unloaded"):
                await request
            await asyncio.sleep(0.2)
            assert loads - before <= 1, loads - before
        await reg.stop()

    run(main())


def test_a_lost_alias_is_not_replaced_by_the_newest_version(store):
    """The production alias deleted outside forgeline, with promotions on record: a running server
    keeps serving what it serves and reports the error; a new one serves nothing rather than the
    newest version, which was never gated for production. A model never promoted still serves its
    newest version."""
    mods, alias, good = _v1_in_production_v2_published(store)  # v2: newer, never promoted

    async def main():
        reg = ModelRegistry(store, config())
        await reg.start()
        x = batch(2)
        assert (await reg.infer("digits", None, {"input": x})).version == "v1"
        store.delete(alias)
        await wait_until(lambda: reg.metrics.value("alias_reads_total", model="digits", result="failed") >= 3)
        out = await reg.infer("digits", None, {"input": x})
        assert out.version == "v1" and np.allclose(out["output"], eager(mods["v1"], x), atol=1e-5)
        assert "the production alias is missing, but digits has promotions on record" in (
            reg.metadata("digits")["parameters"]["alias_error"])
        await reg.stop()

        fresh = ModelRegistry(store, config())
        await fresh.start()
        with pytest.raises(Exception, match="production alias is missing"):
            await fresh.infer("digits", None, {"input": x})
        store.write_atomic(alias, good)
        assert (await fresh.infer("digits", None, {"input": x})).version == "v1"
        await fresh.stop()

    run(main())


def test_a_server_started_on_an_empty_store_says_so_and_serves_a_model_published_later(store, caplog):
    async def main():
        reg = ModelRegistry(store, config())
        await reg.start()
        with pytest.raises(ModelNotFound, match="nothing published under models/digits"):
            await reg.infer("digits", None, {"input": batch(1)})
        m = publish(store, "digits", "v1", 1)
        x = batch(2)
        assert np.allclose((await reg.infer("digits", None, {"input": x}))["output"], eager(m, x), atol=1e-5)
        await reg.stop()

    with caplog.at_level("WARNING"):
        run(main())
    [warned] = [r.getMessage() for r in caplog.records if "no model is published" in r.getMessage()]
    assert store.uri("models") in warned, warned


def test_watcher_does_not_reload_a_model_evicted_while_it_read_the_alias(store):
    """The alias watcher reads every serving model's alias off the event loop; a model the LRU
    evicts meanwhile must stay evicted (its next request loads it), not be loaded back by the
    watcher, which would evict another model in turn."""
    publish(store, "a", "v1", 1)

    async def main():
        reg = ModelRegistry(store, config(poll_s=3600.0))
        await reg.start()
        await reg.infer("a", None, {"input": batch(1)})
        m = reg._models["a"]
        m.production = None  # as after a request-driven load: the watcher sees the alias "change"
        io = reg._io

        async def read_then_evict(fn, *args, **kw):
            out = await io(fn, *args, **kw)
            reg._evict_now(m, "v1", "evicted (LRU) by the test")
            return out

        reg._io = read_then_evict
        await reg._poll()
        await asyncio.sleep(0.2)
        assert not reg.model_ready("a") and not m.loading and m.production == "v1"
        assert reg.metrics.value("loads_total", model="a", result="ok") == 1
        reg._io = io
        await reg.infer("a", None, {"input": batch(1)})  # the next request loads it
        assert reg.model_ready("a")
        await reg.stop()

    run(main())


def test_swap_in_within_poll_s_reads_neither_alias_nor_manifest_again(store):
    """A model evicted moments ago loads back on the alias and manifest read less than poll_s
    ago (as current as what a resident model serves: the watcher re-reads every poll_s); once
    that read is older than poll_s, the next swap-in reads the alias again and follows it."""
    mods = {n: publish(store, n, "v1", i) for i, n in enumerate(["a", "b"])}
    size = weight_size(mods["a"])
    promotion.promote(store, "a", "v1")

    async def main():
        reg, x = await a_evicted_by_b(store, size, poll_s=3600.0)
        reads = []
        io = reg._io

        async def counted(fn, *args, **kw):
            reads.append(getattr(fn, "__name__", fn))
            return await io(fn, *args, **kw)

        reg._io = counted
        v2 = publish(store, "a", "v2", 7)
        promotion.promote(store, "a", "v2")
        out = await reg.infer("a", None, {"input": x})  # evicts b; a's reads are fresh
        assert reads == [] and out.version == "v1"
        np.testing.assert_allclose(out["output"], eager(mods["a"], x), atol=1e-5)
        await reg.infer("b", None, {"input": x})  # evicts a again
        reg._models["a"].reference_at -= 3600.0  # the alias read is now older than poll_s
        out = await reg.infer("a", None, {"input": x})
        assert "serving_reference" in reads and "read_manifest" in reads and out.version == "v2"
        np.testing.assert_allclose(out["output"], eager(v2, x), atol=1e-5)
        await reg.stop()

    run(main())


def test_released_weights_are_freed_and_the_shell_is_reused(store):
    """Releasing a version puts the meta tensors its shell was built with back (no copy to meta,
    nothing left referencing the weights), and the next load of that architecture fills the
    same module object with the new weights."""
    import gc
    import weakref

    from pipeline.serving import loader

    mods = {n: publish(store, n, "v1", i) for i, n in enumerate(["a", "b"])}
    lv = loader.load_version(store, "a", "v1")
    module = lv.module
    weight = weakref.ref(module.head[-1].weight)
    assert not module.training and not module.head[-1].weight.is_meta
    loader.release(lv)
    del lv
    gc.collect()
    assert weight() is None  # the weights are gone with the release
    assert all(t.is_meta for t in [*module.parameters(), *module.buffers()])
    lv = loader.load_version(store, "b", "v1")
    assert lv.module is module and lv.nbytes == loader.weight_bytes(mods["b"])
    x = torch.from_numpy(batch(3))
    np.testing.assert_allclose(lv.run(x.numpy()), eager(mods["b"], x.numpy()), atol=1e-5)
    loader.release(lv)


def test_reload_after_eviction_still_verifies_every_byte(store, tmp_path):
    """The golden check is skipped on a re-load only because the bytes are verified again: a
    shard changed in place (same size) after the first load fails the re-load by its sha256."""
    mods = {n: publish(store, n, "v1", i) for i, n in enumerate(["a", "b"])}
    size = weight_size(mods["a"])

    async def main():
        reg, x = await a_evicted_by_b(store, size, retry_failed_s=0.0)
        shard = tmp_path / "store" / export.version_prefix("a", "v1") / "model.safetensors"
        data = bytearray(shard.read_bytes())
        data[-17] ^= 0x40
        shard.write_bytes(bytes(data))
        with pytest.raises(Exception, match="sha256 mismatch"):
            await reg.infer("a", None, {"input": x})
        assert not reg.model_ready("a")
        await reg.stop()

    run(main())


def test_load_from_s3_asks_for_each_file_once_and_an_incomplete_version_is_unusable(s3_storage, s3_requests):
    """A version loaded from S3 by the server: its manifest is read once; then, all at once, its
    shard (first GET: size, ETag, bytes, never stat-ed on top), a stat of each other file it lists,
    and its golden outputs. With its shard gone, the version is refused as incomplete, naming the
    file."""
    from pipeline.serving import loader

    publish(s3_storage, "digits", "v1", 0)
    req = s3_requests(s3_storage.client)
    lv = loader.load_version(s3_storage, "digits", "v1")
    assert lv.golden["checked"]
    assert sorted(req.of("HEAD")) == sorted(["v1/golden.safetensors", f"v1/{export.INDEX_NAME}"])  # no shard
    assert sorted(req.of("header")) == ["v1/golden.safetensors", "v1/manifest.json", "v1/model.safetensors"]
    assert req.together("v1/golden.safetensors", "v1/model.safetensors")
    assert req.together(f"v1/{export.INDEX_NAME}", "v1/model.safetensors")
    loader.release(lv)
    s3_storage.delete(export.version_prefix("digits", "v1") + "/model.safetensors")
    with pytest.raises(loader.VersionUnusable, match=r"digits/v1: model\.safetensors is missing"):
        loader.load_version(s3_storage, "digits", "v1")


def test_corrupted_shm_copy_is_never_served(store, tmp_path):
    true = publish(store, "digits", "v1", 1)
    promotion.promote(store, "digits", "v1")
    tier = ShmTier(tmp_path / "shm")
    assert tier.prewarm(store, "digits", "v1").bytes > 0

    async def serve_once() -> tuple[np.ndarray, dict, ModelRegistry]:
        reg = ModelRegistry(store, config(), tier=tier)
        await reg.start()
        x = batch(4)
        out = (await reg.infer("digits", None, {"input": x}))["output"]
        np.testing.assert_allclose(out, eager(true, x), atol=1e-5)
        p = reg.metadata("digits")["parameters"]
        await reg.stop()
        return out, p, reg

    # an intact copy is served from the tier
    _, p, reg = run(serve_once())
    assert p["source"] == "shm" and p["last_swap"]["tier_problem"] is None

    # flip one byte of tensor data in the tier's copy (same size: only the sha256 can tell)
    shard = tier.resolve("digits", "v1") / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-17] ^= 0x40
    shard.write_bytes(bytes(data))
    assert tier.complete("digits", "v1")
    _, p, reg = run(serve_once())
    assert p["source"] == "storage" and "sha256 mismatch" in p["last_swap"]["tier_problem"]
    assert not tier.complete("digits", "v1")  # dropped from the tier
    assert reg.metrics.value("tier_rejects_total", model="digits") == 1


def test_a_device_out_of_memory_keeps_the_good_shm_copy(store, tmp_path, monkeypatch):
    """A load that runs out of device memory says so and leaves the tier's copy: the copy is not
    what failed, and other servers on the node may be using it."""
    import torch

    from pipeline.serving import loader

    publish(store, "digits", "v1", 1)
    promotion.promote(store, "digits", "v1")
    tier = ShmTier(tmp_path / "shm")
    tier.prewarm(store, "digits", "v1")
    real = loader._fill

    def fill(folder, dev, manifest, st):
        if st is None:  # the tier's copy
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(folder, dev, manifest, st)

    monkeypatch.setattr(loader, "_fill", fill)

    async def main():
        reg = ModelRegistry(store, config(), tier=tier)
        await reg.start()
        with pytest.raises(Exception, match="out of memory"):
            await reg.infer("digits", None, {"input": batch(2)})
        await reg.stop()

    run(main())
    assert tier.complete("digits", "v1")  # kept


def test_queue_bound_and_slow_load_does_not_block_other_models(store):
    fast = publish(store, "fast", "v1", 1)
    publish(store, "slow", "v1", 2)
    publish(store, "slow2", "v1", 3)

    async def main():
        reg = ModelRegistry(store, config(queue_limit=2))
        real = reg._load_fn

        def slow_load(store, name, version, **kw):
            if name.startswith("slow"):
                time.sleep(1.0)
            return real(store, name, version, **kw)

        reg._load_fn = slow_load
        await reg.start()
        x = batch(2)
        await reg.infer("fast", None, {"input": x})

        slow = [asyncio.create_task(reg.infer("slow", None, {"input": x})) for _ in range(5)]
        slow2 = asyncio.create_task(reg.infer("slow2", None, {"input": x}))
        await asyncio.sleep(0.05)
        assert {r["name"]: r["state"] for r in reg.index()}["slow"] == "LOADING"
        t0 = time.monotonic()
        for i in range(20):  # the other model answers while "slow" loads
            out = await reg.infer("fast", None, {"input": batch(1, i)})
            np.testing.assert_allclose(out["output"], eager(fast, batch(1, i)), atol=1e-5)
        assert time.monotonic() - t0 < 0.9  # well before the 1 s load of "slow" ends
        results = await asyncio.gather(*slow, slow2, return_exceptions=True)
        # loads of different models ran at the same time (two 1 s loads in well under 2 s)
        assert time.monotonic() - t0 < 1.8
        rejected = [r for r in results if isinstance(r, Unavailable)]
        assert len(rejected) == 3 and all("queue_limit 2" in str(r) and r.retry_after_s > 0 for r in rejected)
        assert sum(isinstance(r, dict) for r in results) == 3
        await reg.stop()

    run(main())


def test_stop_drains_in_flight_requests_and_unload(store):
    m = publish(store, "digits", "v1", 1)

    async def main():
        reg = ModelRegistry(store, config(max_queue_delay_ms=300.0))
        await reg.start()
        await reg.load("digits")
        xs = [batch(1, i) for i in range(3)]
        pending = [asyncio.create_task(reg.infer("digits", None, {"input": x})) for x in xs]
        await asyncio.sleep(0.05)  # they wait in the batcher (300 ms delay)
        stopping = asyncio.create_task(reg.stop(drain_timeout_s=5))
        await asyncio.sleep(0.01)
        assert not reg.ready()
        with pytest.raises(Unavailable, match="draining"):
            await reg.infer("digits", None, {"input": xs[0]})
        outs = await asyncio.gather(*pending)
        await stopping
        for x, o in zip(xs, outs):
            np.testing.assert_allclose(o["output"], eager(m, x), atol=1e-5)
        assert not reg.live()

        reg = ModelRegistry(store, config())
        await reg.start()
        await reg.load("digits")
        await reg.unload("digits")
        assert not reg.model_ready("digits")
        with pytest.raises(Unavailable, match="unloaded"):
            await reg.infer("digits", None, {"input": xs[0]})
        await wait_until(lambda: reg._used() == 0)
        await reg.load("digits")
        assert reg.model_ready("digits")
        await reg.stop()

    run(main())


def test_quantized_variant_is_served_dequantized(store, caplog):
    from pipeline import package

    publish(store, "digits", "v1", 1, width=16)  # wide enough for layers to be quantized
    package.publish_quantized(store, "digits", "v1", "int8")
    reference = package.load_quantized_module(store, "digits-int8", "v1")

    async def main():
        reg = ModelRegistry(store, config(models=["digits-int8"]))
        await reg.start()  # preloads the listed model (never promoted: its newest version serves)
        await wait_until(lambda: reg.model_ready("digits-int8"))
        x = batch(6)
        out = await reg.infer("digits-int8", None, {"input": x})
        np.testing.assert_allclose(out["output"], eager(reference, x), atol=1e-5)
        p = reg.metadata("digits-int8")["parameters"]
        assert p["lineage"]["quantization"] == "int8" and p["lineage"]["base"] == {"model": "digits", "version": "v1"}
        assert p["golden"]["checked"] and p["production"] == "v1" and p["alias"] is None
        assert p["resident_bytes"] == weight_size(reference)
        with pytest.raises(ModelNotFound, match="this server serves"):
            await reg.infer("digits", None, {"input": x})
        await reg.stop()

    with caplog.at_level("INFO", logger="forgeline.serving"):
        run(main())
    assert any(re.fullmatch(r"digits-int8: serving v1 \(\d+\.\d+s, preload\)", r.getMessage()) for r in caplog.records)
