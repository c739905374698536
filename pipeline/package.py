"""Packaging steps composed from the engine, one call per asset: :func:`export_trained` (find or
export the trained checkpoint as a version with its golden outputs, then check it bit for bit) and
:func:`quantize_and_gate` (quantized versions published beside it, ``<model>-int8/<version>``, with
their scheme in every shard's safetensors metadata, measured against the base and gated; a variant
that fails is marked rejected in its manifest) and :func:`compare_with_production` (the new
version against the one in production, on the same held-out data: a retrain that came out worse
is not promoted)."""

from __future__ import annotations

import time

import torch

from pipeline import export, promotion, quantize
from pipeline.evaluate import evaluate, fixed_batch
from pipeline.models import build_model
from pipeline.storage import Storage
from pipeline.train.checkpoints import read_checkpoint


def module_from_checkpoint(store: Storage, key: str, sha256: str | None, name: str, kwargs: dict) -> torch.nn.Module:
    """The trained model as it was at the end of training (eval mode, CPU)."""
    state = read_checkpoint(store, key, sha256)["model"]
    with torch.device("meta"):
        module = build_model(name, **kwargs)
    module.load_state_dict(state, assign=True)
    return module.eval()


def input_shape(spec: dict) -> tuple[int, int, int]:
    """One sample's shape as the preprocessing ``spec`` produces it: ``(channels, crop, crop)``."""
    return (len(spec["mean"]), int(spec["crop"]), int(spec["crop"]))


def export_trained(
    store: Storage, model: str, *, checkpoint: str, checkpoint_sha256: str, architecture: str, model_kwargs: dict,
    spec: dict, check_shards: list[str], run_id: str | None = None, data_version: str | None = None,
    batches: list[str] | None = None, dtype: str | None = None, max_shard_bytes: int = export.DEFAULT_MAX_SHARD_BYTES,
) -> dict:
    """Publish a training checkpoint as a version of ``model`` and check it.

    The same weights exported the same way (checkpoint sha256, ``dtype``, ``max_shard_bytes``) are
    the same version: a re-run reuses it instead of publishing a copy. Otherwise the checkpoint is
    streamed into a new version with golden outputs (the exported model on
    ``export.golden_input(input_shape(spec))``) and, in the manifest metadata, the ``spec`` and the
    training ``batches`` (the drift checks' reference). Then every shard is verified and every
    tensor and the outputs on the first samples of ``check_shards`` compared with the checkpoint's
    model (``export.check_version``); the result is recorded as the gate ``loads_back_bit_exact``
    in the manifest, and problems reject the version. Returns ``{"manifest", "reused", "seconds"
    (the export, not the check), "problems"}``."""
    t0 = time.perf_counter()
    origin = {"checkpoint_sha256": checkpoint_sha256, "dtype": dtype, "max_shard_bytes": max_shard_bytes}
    reused = export.find_version(store, model, origin)
    if reused is not None:
        manifest = export.read_manifest(store, model, reused)
    else:
        source = export.from_checkpoint(store, checkpoint, model_name=architecture, model_kwargs=model_kwargs,
                                        expected_sha256=checkpoint_sha256,
                                        dtype=getattr(torch, dtype) if dtype else None)
        exported = export.module_from_state({"model": model, "version": "(new)", "config": source.config}, dict(source))
        golden = export.golden_outputs(exported, export.golden_input(input_shape(spec)))
        del exported
        manifest = export.export(
            source, store, model, max_shard_bytes=max_shard_bytes, run_id=run_id, data_version=data_version,
            metadata={"spec": spec, "source": origin, "dataset": {"version": data_version, "batches": batches}},
            golden=golden,
        )
    seconds = time.perf_counter() - t0
    reference = module_from_checkpoint(store, checkpoint, checkpoint_sha256, architecture, model_kwargs)
    problems = export.check_version(store, model, manifest["version"], reference, fixed_batch(check_shards, spec))
    # recorded in the manifest either way (what `forgeline models` and a promotion by hand show): a
    # failed check rejects the version, which is then never latest, nor promotable
    manifest = export.record_gates(store, model, manifest["version"], {"loads_back_bit_exact": {
        "passed": not problems, "value": len(problems), "limit": 0, "unit": "problems", "problems": problems}})
    return {"manifest": manifest, "reused": reused is not None, "seconds": seconds, "problems": problems}


def quantized_name(model: str, scheme: str) -> str:
    return f"{model}-{scheme}"


def publish_quantized(
    store: Storage, model: str, version: str, scheme: str, *, group_size: int = 128, symmetric: bool = True,
    state: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Quantize the published ``model/version`` and publish it as ``<model>-<scheme>/<version>``.
    ``state``: the base version's tensors when the caller already loaded them (saves a verified
    re-read). Returns ``{"manifest", "ratio", "skipped", "quantization", "tensor_seconds", "reused"}``.

    Versions are immutable: when ``<model>-<scheme>/<version>`` is already published with the same
    parameters (a re-run on a reused base version) it is verified and returned (``reused``), and
    with different parameters it is a :class:`export.VersionExists` error."""
    base = export.read_manifest(store, model, version)
    qname = quantized_name(model, scheme)
    if version in export.list_versions(store, qname):
        return _reuse_quantized(store, qname, version, scheme, group_size, symmetric)
    if state is None:
        state = export.load_state_dict(store, model, version)
    qs = quantize.quantize_state_dict(state, scheme, group_size=group_size, symmetric=symmetric)
    base_golden = export.read_golden(store, model, version)
    golden = None
    if base_golden is not None:  # the dequantized model on the base's golden input
        module = export.module_from_state(base, quantize.dequantize_state_dict(qs.tensors, qs.metadata))
        golden = export.golden_outputs(module, base_golden["input"])
        del module
    manifest = export.export(
        qs.tensors, store, quantized_name(model, scheme), version,
        config=base["config"], run_id=base.get("run_id"), data_version=base.get("data_version"),
        header_metadata=quantize.metadata_for_safetensors(qs),
        metadata={"quantization": qs.metadata, "base": {"model": model, "version": version}, "skipped": qs.skipped,
                  "size_ratio": qs.ratio},
        golden=golden,
    )
    return {"manifest": manifest, "ratio": qs.ratio, "skipped": qs.skipped, "quantization": qs.metadata,
            "tensor_seconds": qs.tensor_seconds, "reused": False}


def _reuse_quantized(store: Storage, qname: str, version: str, scheme: str, group_size: int,
                     symmetric: bool) -> dict:
    manifest = export.read_manifest(store, qname, version)
    q = manifest["metadata"]["quantization"]
    want = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None, "symmetric": symmetric}
    have = {k: q.get(k) for k in want}
    if have != want:
        raise export.VersionExists(f"{qname}/{version} is published with {have}, not {want}; versions are immutable: "
                                   "export a new base version to quantize it differently")
    problems = export.verify(store, qname, version)
    if problems:
        raise export.VerificationFailed(f"{qname}/{version}", problems)
    return {"manifest": manifest, "ratio": manifest["metadata"]["size_ratio"], "quantization": q,
            "skipped": manifest["metadata"].get("skipped", {}), "tensor_seconds": [], "reused": True}


def load_quantized_module(store: Storage, model: str, version: str) -> torch.nn.Module:
    """A published quantized version, dequantized on load into the float architecture."""
    manifest = export.read_manifest(store, model, version)
    tensors = export.load_state_dict(store, model, version)
    state = quantize.dequantize_state_dict(tensors, manifest["metadata"]["quantization"])
    return export.module_from_state(manifest, state)


def quantize_and_gate(
    store: Storage, model: str, version: str, test_shards: list[str], spec: dict, *,
    schemes: list[str], max_drop_points: dict[str, float], group_size: int = 128, symmetric: bool = True,
    min_accuracy: float = 0.0,
) -> dict:
    """Publish each scheme of ``model/version``, measure the held-out accuracy of what was
    published (dequantized on load) against the base, and list every scheme whose drop exceeds its
    limit or whose accuracy is under ``min_accuracy`` (an absolute floor, 0..1). The base version is read and verified once. Each variant's gate result is recorded in its
    manifest (``export.record_gates``, as ``accuracy_gate``): a failing variant is rejected, so it is
    never ``latest`` nor promotable. Returns ``{"base_accuracy", "variants": {scheme: {model,
    version, accuracy, drop_points, size_ratio, bytes, skipped, seconds, tensor_seconds, reused,
    gate}}, "gates": {"accuracy_gate.<scheme>": gate}, "failures"}`` (``gate``: ``{"passed",
    "value" (drop, points), "limit", "unit", "accuracy", "base_accuracy"}``; ``seconds``:
    quantize, publish and evaluate the scheme; ``tensor_seconds``: per quantized tensor)."""
    manifest = export.read_manifest(store, model, version)
    state = export.load_state_dict(store, model, version)
    base = evaluate(export.module_from_state(manifest, state), test_shards, spec).accuracy
    variants, gates, failures = {}, {}, []
    for scheme in schemes:
        t0 = time.perf_counter()
        pub = publish_quantized(store, model, version, scheme, group_size=group_size, symmetric=symmetric, state=state)
        qname = quantized_name(model, scheme)
        acc = evaluate(load_quantized_module(store, qname, version), test_shards, spec).accuracy
        drop, limit = 100 * (base - acc), max_drop_points[scheme]
        if drop > limit:
            failures.append(f"{scheme}: accuracy {acc:.4f} is {drop:.2f} points below {base:.4f} (limit {limit})")
        if acc < min_accuracy:
            failures.append(f"{scheme}: accuracy {acc:.4f} is under min_accuracy {min_accuracy}")
        gate = {"passed": drop <= limit and acc >= min_accuracy, "value": drop, "limit": limit,
                "unit": "accuracy points dropped", "accuracy": acc, "base_accuracy": base, "min_accuracy": min_accuracy}
        export.record_gates(store, qname, version, {"accuracy_gate": gate})
        gates[f"accuracy_gate.{scheme}"] = gate
        variants[scheme] = {"model": qname, "version": version, "accuracy": acc, "drop_points": drop,
                            "size_ratio": pub["ratio"], "bytes": pub["manifest"]["bytes"], "skipped": pub["skipped"],
                            "seconds": time.perf_counter() - t0, "tensor_seconds": pub["tensor_seconds"],
                            "reused": pub["reused"], "gate": gate}
    return {"base_accuracy": base, "variants": variants, "gates": gates, "failures": failures}


def compare_with_production(
    store: Storage, model: str, version: str, test_shards: list[str], spec: dict, *, max_regression_points: float,
) -> dict:
    """The gate ``not_worse_than_production``: the held-out accuracy of ``model/version`` against
    that of the version in production, both on ``test_shards`` (each model under its own
    preprocessing spec, so a change of crop or normalisation is compared fairly). It fails when
    the new version is more than ``max_regression_points`` accuracy points below production.
    Nothing to compare (no production version, production is this version, or production is no
    longer servable or loadable) passes, saying why in ``reason``; a store that does not answer
    raises. A comparison made is recorded in the version's manifest (``export.record_gates``): a
    version that lost is rejected, so never ``latest`` nor promotable, until a comparison it wins.
    Returns ``{"passed", "value" (points below production; negative = better), "limit", "unit",
    "accuracy", "production_accuracy", "production_version", "samples", "reason"}``."""
    gate = {"passed": True, "value": 0.0, "limit": max_regression_points, "unit": "accuracy points below production",
            "accuracy": None, "production_accuracy": None, "production_version": None, "samples": 0}
    try:
        current, current_manifest = promotion.resolve_manifest(store, model, promotion.ALIAS)
    except promotion.NotPromoted:
        return gate | {"reason": f"{model} has no production version yet: nothing to compare against"}
    except promotion.PromotionError as e:  # rejected, withdrawn or damaged since: replacing it is the fix
        return gate | {"reason": f"nothing to compare against: {e}"}
    gate["production_version"] = current
    if current == version:
        return gate | {"reason": f"{model}/{version} is the production version"}
    new = evaluate(export.module_from_state(export.read_manifest(store, model, version),
                                            export.load_state_dict(store, model, version)), test_shards, spec)
    try:
        production_module = export.module_from_state(current_manifest, export.load_state_dict(store, model, current))
    except export.ExportError as e:  # damaged shards, an architecture gone: as unservable; a store down raises
        return gate | {"reason": f"nothing to compare against: production {model}/{current} cannot be loaded: {e}"}
    prod_spec = (current_manifest.get("metadata") or {}).get("spec") or spec
    prod = evaluate(production_module, test_shards, prod_spec)
    below = 100 * (prod.accuracy - new.accuracy)
    passed = below <= max_regression_points
    said = (f"accuracy {new.accuracy:.4f} against production {current}'s {prod.accuracy:.4f} on the same "
            f"{new.samples} held-out samples")
    reason = said if passed else (f"{model}/{version}: {said}: {below:.2f} points below it "
                                  f"(limit {max_regression_points})")
    gate |= {"passed": passed, "value": below, "accuracy": new.accuracy, "production_accuracy": prod.accuracy,
             "samples": new.samples, "reason": reason}
    export.record_gates(store, model, version, {"not_worse_than_production": gate})
    return gate
