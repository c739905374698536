"""Loading one published version into the server (synchronous; the registry runs it in a thread).

:func:`load_version` does, in order:

1. reads the version's manifest from *storage* (the authority; the tier only holds a copy) and
   refuses a version that is incomplete or rejected (:func:`pipeline.export.version_problem`);
2. builds the architecture on the meta device and fills it with :func:`pipeline.loading.load`
   (``module=``: the loaded tensors *are* the parameters, one copy, never two). On the CPU the
   tensors get their own memory (``owned=True``): a mapping of the tier's or the storage's files
   would keep following those files, so bytes changed under the server after the check would be
   served; on CUDA the weights land in device memory anyway;
3. reads from the shm tier when the version is complete there. Every shard of the tier copy must
   have the size and sha256 the *storage* manifest records (checked while loading,
   ``verify=True, expected_sha256=``); a copy that does not is dropped from the tier and the
   version re-read from storage (``LoadedVersion.tier_problem`` says why). Wrong weights are never
   served: storage reads are sha256-verified too;
4. runs the golden check: the version's ``golden.safetensors`` (recorded at export: a fixed batch
   and the eval-mode float32 outputs) is fed through the module that will serve (compiled, if
   asked) and every output must be within ``golden_atol`` of the recorded one
   (:class:`GoldenMismatch` otherwise). This also warms the module up. A version without golden
   outputs is accepted unless ``require_golden`` (``LoadedVersion.golden["checked"]`` is False).
   ``golden_rows`` narrows or (0) skips it for a re-load of bytes that already passed. The golden
   file is read while the weights load (kept by its sha256: read once per process);
5. with ``compile=True``: an AOTInductor package through
   :func:`pipeline.compile_cache.aot_compile_with_cache`: one package for batch sizes 1 to
   ``max_batch_size`` (or the golden batch, if larger), keyed by the architecture, not the weights,
   which are bound from the loaded module (no copy). A cache hit loads the package in well under a
   second; a miss exports and builds it and stores it for every later version of the architecture.
   A model ``torch.export`` cannot capture falls back to ``torch.compile`` through
   :func:`~pipeline.compile_cache.compile_with_cache` (``dynamic=True``), with a warning.
   ``LoadedVersion.compile`` says which, hit or miss and why, and the seconds of each step.
   Compiles run one at a time in the process (Dynamo is not thread-safe).

Input/output specs (:class:`TensorSpec`) come from the golden tensors when present (their shape
past the batch dimension), else from the architecture's ``in_channels``/``num_classes`` kwargs with
``-1`` for what it does not fix.

This module never imports dagster.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import export
from pipeline.loading import LoadError, LoadReport, load, module_slots
from pipeline.loading.sources import published_version
from pipeline.storage import Storage, StorageError

log = logging.getLogger("forgeline.serving")

_COMPILE_LOCK = threading.Lock()
_DATATYPES = {np.dtype(np.float32): "FP32"}


class GoldenMismatch(Exception):
    """The loaded version does not reproduce the outputs its export recorded."""


class VersionUnusable(Exception):
    """The version cannot be served (incomplete, rejected, no architecture, ...)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # without the batch dimension; -1 = any size
    dtype: np.dtype = np.dtype(np.float32)

    @property
    def datatype(self) -> str:
        return _DATATYPES.get(self.dtype, str(self.dtype).upper())

    def as_metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.shape]}


@dataclass
class LoadedVersion:
    model: str
    version: str
    manifest: dict
    module: torch.nn.Module  # the eager module (owns the weights)
    forward: Callable[[torch.Tensor], torch.Tensor]  # what serves: the module or its compiled form
    device: torch.device
    input: TensorSpec
    output: TensorSpec
    nbytes: int  # weight bytes held (parameters + buffers)
    source: str  # "shm" | "storage"
    tier_problem: str | None = None
    golden: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    load_report: str = ""
    compile: dict | None = None
    dtype: torch.dtype = torch.float32  # the weights' floating dtype: inputs are cast to it

    def run(self, batch: np.ndarray) -> np.ndarray:
        """One forward on a stacked float32 batch; float32 rows back (runs in an executor thread)."""
        x = torch.from_numpy(batch)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        with torch.inference_mode():
            y = self.forward(x.to(self.device, non_blocking=True))
            y = y.detach().to("cpu", torch.float32)
        return y.numpy()

    def lineage(self) -> dict:
        m = self.manifest
        meta = m.get("metadata") or {}
        out = {"run_id": m.get("run_id"), "data_version": m.get("data_version"), "created": m.get("created")}
        if meta.get("base"):
            out["base"] = meta["base"]
        if meta.get("quantization"):
            out["quantization"] = meta["quantization"].get("scheme")
        return out


def _float_dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the module's parameters and buffers."""
    seen: dict[Any, int] = {}
    for _, d, name in module_slots(module):
        t = d[name]
        if t.is_meta:
            continue
        s = t.untyped_storage()
        seen[(s.device, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


# Meta-device shells of released (evicted) versions, by architecture: a swap-in of a model whose
# architecture was loaded before takes one instead of building it again (~1 ms for a small CNN,
# most of a small model's swap-in). The weights are gone before a shell is kept: each slot gets
# back the meta tensor the shell was built with (``_META``), so a release allocates nothing and
# runs no ``Module.to`` (most of a small model's release).
_SHELLS: dict[str, list[torch.nn.Module]] = {}
_SHELLS_PER_ARCH = 4
_SHELL_LOCK = threading.Lock()
_META: weakref.WeakKeyDictionary[torch.nn.Module, list[tuple[dict, str, torch.Tensor]]] = weakref.WeakKeyDictionary()

# Golden outputs by their sha256 (from the manifest): immutable, so a re-load reads them once.
_GOLDEN: dict[str, dict[str, torch.Tensor]] = {}
_GOLDEN_KEEP = 256
_GOLDEN_LOCK = threading.Lock()


def _arch_key(manifest: dict) -> str:
    cfg = manifest.get("config") or {}
    return json.dumps([cfg.get("architecture"), cfg.get("kwargs") or {}], sort_keys=True, default=str)


def _shell(manifest: dict) -> torch.nn.Module:
    """A meta-device module of the manifest's architecture, in eval mode (a kept one if any)."""
    with _SHELL_LOCK:
        kept = _SHELLS.get(_arch_key(manifest))
        if kept:
            return kept.pop()
    module = meta_module(manifest).eval()
    _META[module] = [(d, n, d[n]) for _, d, n in module_slots(module)]
    return module


def _keep_shell(loaded: LoadedVersion) -> None:
    """Keep the released module's structure (weights dropped to meta) for the next load of its
    architecture. Not after a compile: the compiled program was built around this object."""
    module = loaded.module
    if module is None or loaded.compile is not None:
        return
    for d, name, t in _META[module]:  # every module load_version serves is built by _shell
        d[name] = t
    if module.training:  # put in train mode by someone: a shell serves in eval mode
        module.eval()
    with _SHELL_LOCK:
        kept = _SHELLS.setdefault(_arch_key(loaded.manifest), [])
        if len(kept) < _SHELLS_PER_ARCH:
            kept.append(module)


def _golden(store: Storage, model: str, version: str, manifest: dict, root: str) -> dict[str, torch.Tensor] | None:
    g = manifest.get("golden")
    if not g:
        return None
    sha = str(g.get("sha256"))
    got = _GOLDEN.get(sha)
    if got is None:
        got = export.read_golden(store, model, version, root=root, manifest=manifest)
        with _GOLDEN_LOCK:  # loads run in threads (and the read in the reader's)
            if len(_GOLDEN) >= _GOLDEN_KEEP:
                _GOLDEN.pop(next(iter(_GOLDEN)), None)
            _GOLDEN[sha] = got
    return got


def meta_module(manifest: dict) -> torch.nn.Module:
    """The manifest's architecture on the meta device (no memory), ready for ``load(module=)``."""
    from pipeline.models import build_model

    cfg = manifest.get("config") or {}
    arch = cfg.get("architecture")
    if not arch:
        raise VersionUnusable(f"{manifest.get('model')}/{manifest.get('version')}: the manifest names no architecture")
    with torch.device("meta"):
        return build_model(arch, **(cfg.get("kwargs") or {}))


def estimate_bytes(manifest: dict) -> int:
    """Resident bytes the version will take once loaded (before loading it): the manifest's tensor
    bytes; for a quantized version, the architecture's tensors at the exported floating dtype (it
    is dequantized on load)."""
    if not _quantized(manifest):
        return int(manifest.get("total_size") or 0)
    try:
        module = meta_module(manifest)
    except Exception:  # noqa: BLE001 - an unusable version fails later, with its reason
        return int(manifest.get("total_size") or 0)
    dt = getattr(torch, str((manifest.get("config") or {}).get("dtype")), None)
    size = torch.empty((), dtype=dt).element_size() if isinstance(dt, torch.dtype) else None
    return sum(t.numel() * (size if size and t.is_floating_point() else t.element_size())
               for t in module.state_dict().values())


def _quantized(manifest: dict) -> bool:
    return bool((manifest.get("metadata") or {}).get("quantization"))


def io_specs(manifest: dict, golden: dict[str, torch.Tensor] | None) -> tuple[TensorSpec, TensorSpec]:
    """Input and output specs (without the batch dimension): the golden outputs' shapes, else the
    architecture's channels and classes (its config, else its constructor's defaults); -1 where
    nothing says (an architecture forgeline does not know: such a version does not load either)."""
    if golden is not None:
        return (TensorSpec("input", tuple(int(s) for s in golden["input"].shape[1:])),
                TensorSpec("output", tuple(int(s) for s in golden["output"].shape[1:])))
    from pipeline.models import REGISTRY

    kwargs = (manifest.get("config") or {}).get("kwargs") or {}
    cls = REGISTRY.get((manifest.get("config") or {}).get("architecture"))
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()} if cls is not None else {}
    channels, classes = (kwargs.get(k, defaults.get(k, -1)) for k in ("in_channels", "num_classes"))
    return TensorSpec("input", (int(channels), -1, -1)), TensorSpec("output", (int(classes),))


def spec_for(store: Storage, model: str, version: str, *, root: str = export.DEFAULT_ROOT) -> tuple[TensorSpec, TensorSpec]:
    """Input/output specs of a published version without loading its weights (a golden read)."""
    manifest = export.read_manifest(store, model, version, root=root)
    golden = export.read_golden(store, model, version, root=root, manifest=manifest) if manifest.get("golden") else None
    return io_specs(manifest, golden)


# ---------------------------------------------------------------------------------------------
# references: the production alias, discovery
# ---------------------------------------------------------------------------------------------


def serving_reference(store: Storage, model: str, *, root: str = export.DEFAULT_ROOT,
                      latest_without_alias: bool = True) -> tuple[str | None, dict | None]:
    """``(version to serve, alias record)``: the production alias's version; without an alias the
    newest complete, non-rejected version (when ``latest_without_alias``) of a model never promoted,
    else None. A model promoted before whose alias is gone is an error (:class:`PromotionError`):
    its newest version was never gated for production, so it is not served in the alias's place
    (a running server keeps what it serves and reports the error)."""
    from pipeline import promotion

    record = promotion.production(store, model, root=root)
    if record is not None:
        return record.get("version"), record
    if latest_without_alias:
        if promotion.promoted_before(store, model, root=root):
            raise lost_alias(store, model, root)
        return export.latest_version(store, model, root), None
    return None, None


def lost_alias(store: Storage, model: str, root: str = export.DEFAULT_ROOT) -> Exception:
    """The error for a production alias that is gone from a model promoted before."""
    from pipeline import promotion

    return promotion.PromotionError(
        f"{store.uri(export.version_prefix(model, promotion.ALIAS, root))}: the production alias is missing, "
        f"but {model} has promotions on record: not serving its newest version in the alias's place "
        f"(restore the alias: forgeline promote {model} <version>)")


def discover_models(store: Storage, *, root: str = export.DEFAULT_ROOT) -> list[str]:
    """Names under ``<root>/`` with at least one manifest or a production alias."""
    names = set()
    for obj in store.list(root):
        parts = obj.key[len(root) + 1:].split("/")
        if (len(parts) == 3 and parts[2] == export.MANIFEST_NAME) or (len(parts) == 2 and parts[1] == "production"):
            names.add(parts[0])
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def _tier_copy(tier: Any, model: str, version: str, manifest: dict) -> tuple[Any, str | None]:
    """``(folder, None)`` when the tier holds a complete copy listing the storage manifest's
    shards (names, sizes, sha256s), else ``(None, why)``; the load then checks every byte."""
    folder = tier.resolve(model, version)  # complete: every file it lists has its size
    if folder is None:
        return None, "absent"
    try:
        copy = json.loads((folder / export.MANIFEST_NAME).read_bytes())
    except (OSError, ValueError) as e:
        return None, f"tier manifest unreadable ({e})"
    want = {s["file"]: (int(s["bytes"]), s["sha256"]) for s in manifest["shards"]}
    have = {s["file"]: (int(s["bytes"]), s.get("sha256")) for s in copy.get("shards", [])}
    if want != have:
        return None, "tier manifest lists other shards than storage's"
    return folder, None


def _fill(source: Any, device: torch.device, manifest: dict, storage: Storage | None) -> tuple[torch.nn.Module, LoadReport]:
    module = _shell(manifest)
    rep = LoadReport()
    # allow_rejected: the caller checked the version against the storage manifest (the
    # authority); a tier copy's manifest only lists its files
    load(source, device, storage=storage, module=module, verify=True, owned=device.type == "cpu", report=rep,
         expected_sha256={s["file"]: s["sha256"] for s in manifest["shards"]}, allow_rejected=True)
    return module, rep


def _check_golden(fn: Callable, golden: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                  atol: float, what: str, rows: int | None = None) -> dict:
    if rows == 0:  # see load_version: these verified bytes passed the full check in this process
        return {"checked": True, "rows": 0, "reused": True}
    if rows is not None:  # a re-load of a version this process already checked in full
        golden = {k: v[:rows] for k, v in golden.items()}
    with torch.inference_mode():
        got = fn(golden["input"].to(device, dtype)).detach().to("cpu", torch.float32)
    want = golden["output"]
    if got.shape != want.shape:
        raise GoldenMismatch(f"{what}: golden check failed: outputs are {list(got.shape)}, "
                             f"the export recorded {list(want.shape)}")
    diff = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    if not diff <= atol:  # also catches NaN
        raise GoldenMismatch(f"{what}: golden check failed: max |output - recorded| = {diff:.3g} > atol {atol:g} "
                             f"on the {want.shape[0]} recorded inputs")
    return {"checked": True, "max_abs_diff": diff, "rows": int(want.shape[0]), "atol": atol}


def _load_weights(store: Storage, model: str, version: str, manifest: dict, dev: torch.device, tier: Any, root: str,
                  on_tier_reject: Callable[[str], None] | None) -> tuple[torch.nn.Module, LoadReport, str, str | None]:
    """``(module, report, source, tier problem)``: the weights from the tier's copy when it holds a
    good one (a bad one is dropped, and said), else from ``store``."""
    what = f"{model}/{version}"
    source, tier_problem = "storage", None
    module = rep = None
    if tier is not None and root == export.DEFAULT_ROOT:
        folder, why = _tier_copy(tier, model, version, manifest)
        if folder is not None:
            try:
                module, rep = _fill(folder, dev, manifest, None)
                source = "shm"
            except torch.OutOfMemoryError:
                raise  # the device's room, not the copy: the copy stays (other servers may use it)
            except (LoadError, StorageError, OSError, RuntimeError) as e:
                why = str(e).splitlines()[0]
        if why is not None and why != "absent":
            tier_problem = why
            log.warning("%s: the shm tier copy is not served (%s); dropping it and reading from storage", what, why)
            if on_tier_reject is not None:
                on_tier_reject(why)
            try:
                tier.evict(model, version, force=True)
            except Exception as e:  # noqa: BLE001 - the copy is not used either way
                log.warning("%s: could not drop the tier copy: %s", what, e)
    if module is None:
        try:  # the manifest read above; the load checks that the storage copy is complete
            module, rep = _fill(published_version(store, model, version, manifest, root=root), dev, manifest, store)
        except LoadError:
            problem = export.version_problem(store, model, version, root=root, manifest=manifest)
            if problem is not None:
                raise VersionUnusable(problem) from None
            raise
    return module, rep, source, tier_problem


def load_version(
    store: Storage,
    model: str,
    version: str,
    *,
    device: str | torch.device = "cpu",
    tier: Any = None,
    cache: Any = None,
    compile: bool = False,
    compile_mode: str = "default",
    golden_atol: float = 1e-4,
    golden_rows: int | None = None,
    require_golden: bool = False,
    max_batch_size: int = 32,
    root: str = export.DEFAULT_ROOT,
    on_tier_reject: Callable[[str], None] | None = None,
    manifest: dict | None = None,
) -> LoadedVersion:
    """Load, check and warm ``model/version`` (see the module docstring). ``golden_rows`` checks
    only the first rows of the recorded batch; 0 skips the check. The registry passes 0 for an
    eager re-load whose shard sha256s are the ones that passed the full check earlier in this
    process: this load verifies every byte against them, so the same bytes meet the same code
    (and 1 for a compiled re-load, whose program comes from the cache again). ``manifest``: the
    version's manifest when the caller has just read it from ``store``. Raises
    :class:`VersionUnusable`, :class:`GoldenMismatch`, or the loader's/storage's own errors."""
    what = f"{model}/{version}"
    dev = torch.device(device)
    t0 = time.perf_counter()
    try:  # the manifest once: the completeness check and the golden read take it
        if manifest is None:
            manifest = export.read_manifest(store, model, version, root=root)
    except (export.ExportError, StorageError, ValueError) as e:  # say why as the completeness check does
        raise VersionUnusable(export.version_problem(store, model, version, root=root) or str(e)) from None
    # The manifest first (well-formed, not rejected); that the storage copy is complete (a stat
    # per file) only where the bytes come from it: a tier copy is checked against the
    # manifest's sha256s by the load, and a swap-in from the tier makes no storage round trip.
    problem = export.version_problem(store, model, version, root=root, manifest=manifest, files=False)
    if problem is not None:
        raise VersionUnusable(problem)
    g = manifest.get("golden")
    if require_golden and not g:
        raise VersionUnusable(f"{what} has no golden outputs (require_golden is on)")
    # golden outputs not read yet in this process come while the weights load: one round trip
    # less to a remote store
    reader = golden_read = None
    if g and str(g.get("sha256")) not in _GOLDEN:
        reader = ThreadPoolExecutor(1, thread_name_prefix="forgeline-golden")
        golden_read = reader.submit(_golden, store, model, version, manifest, root)
    try:
        module, rep, source, tier_problem = _load_weights(store, model, version, manifest, dev, tier, root,
                                                          on_tier_reject)
    finally:
        if reader is not None:  # the read is not left running past this call, whatever happened
            reader.shutdown(wait=True)
    try:
        golden = golden_read.result() if golden_read is not None else _golden(store, model, version, manifest, root)
    except (export.ExportError, StorageError) as e:
        raise VersionUnusable(export.version_problem(store, model, version, root=root, manifest=manifest)
                              or str(e)) from None
    t_loaded = time.perf_counter()

    inp, out = io_specs(manifest, golden)
    dtype = _float_dtype(module)
    forward: Callable = module
    compile_info = None
    t_compile = 0.0
    if compile:
        from pipeline.compile_cache import aot_compile_with_cache

        # the golden check runs its whole recorded batch through what serves: cover it too
        batch = max(max_batch_size, int(golden["input"].shape[0]) if golden is not None else 1)
        shape = [batch, *(s if s > 0 else 28 for s in inp.shape)]
        example = (golden["input"][:1].expand(batch, *golden["input"].shape[1:]).contiguous()
                   if golden is not None else torch.zeros(shape)).to(dev, dtype)
        tc = time.perf_counter()
        with _COMPILE_LOCK, torch.inference_mode():
            forward, creport = aot_compile_with_cache(
                module, example, cache, max_batch_size=batch, mode=compile_mode,
                dynamic_dims=[i + 1 for i, s in enumerate(inp.shape) if s < 0])  # sizes the spec leaves open
        t_compile = time.perf_counter() - tc
        compile_info = {"kind": creport.kind, "hit": creport.hit, "key": creport.key, "seconds": t_compile,
                        "step_seconds": creport.op_seconds, "bytes": creport.artifact_bytes,
                        "miss_reason": creport.miss_reason, "fallback_reason": creport.fallback_reason,
                        "warnings": list(creport.warnings)}
        log.info("%s: compiled (%s, cache %s) in %.2fs: %s", what, creport.kind,
                 "hit" if creport.hit else f"miss: {creport.miss_reason}", t_compile,
                 ", ".join(f"{k} {v:.2f}s" for k, v in creport.op_seconds.items()))
        for w in creport.warnings:
            log.warning("%s: %s", what, w)

    tg = time.perf_counter()
    if golden is not None:
        golden_info = _check_golden(forward, golden, dev, dtype, golden_atol, what, golden_rows)
    else:
        golden_info = {"checked": False, "reason": "the version has no golden outputs"}
        with torch.inference_mode():  # still warm it up once
            forward(torch.zeros(1, *(s if s > 0 else 28 for s in inp.shape), dtype=dtype, device=dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t_end = time.perf_counter()
    return LoadedVersion(
        model=model, version=version, manifest=manifest, module=module, forward=forward, device=dev,
        input=inp, output=out, nbytes=weight_bytes(module), source=source, tier_problem=tier_problem,
        golden=golden_info, load_report=rep.summary() if rep is not None else "", compile=compile_info, dtype=dtype,
        seconds={"load": t_loaded - t0, "compile": t_compile, "golden": t_end - tg, "total": t_end - t0},
    )


def release(loaded: LoadedVersion) -> None:
    """Drop the version's weights (device memory goes back to the allocator's cache, then the device)."""
    dev = loaded.device
    loaded.forward = None  # type: ignore[assignment]
    _keep_shell(loaded)
    loaded.module = None  # type: ignore[assignment]
    if dev.type == "cuda":
        torch.cuda.empty_cache()


__all__ = [
    "GoldenMismatch",
    "LoadedVersion",
    "TensorSpec",
    "VersionUnusable",
    "discover_models",
    "estimate_bytes",
    "io_specs",
    "load_version",
    "meta_module",
    "release",
    "serving_reference",
    "spec_for",
    "weight_bytes",
]
