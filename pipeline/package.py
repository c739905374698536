"""Packaging steps composed from the engine: the trained module back from its checkpoint, and
quantized versions published beside the exported one (``<model>-int8/<version>``) with their
scheme in every shard's safetensors metadata."""

from __future__ import annotations

import time

import torch

from pipeline import export, quantize
from pipeline.evaluate import evaluate
from pipeline.models import build_model
from pipeline.storage import Storage
from pipeline.train import read_checkpoint


def module_from_checkpoint(store: Storage, key: str, sha256: str | None, name: str, kwargs: dict) -> torch.nn.Module:
    """The trained model as it was at the end of training (eval mode, CPU)."""
    state = read_checkpoint(store, key, sha256)["model"]
    with torch.device("meta"):
        module = build_model(name, **kwargs)
    module.load_state_dict(state, assign=True)
    return module.eval()


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
    manifest = export.export(
        qs.tensors, store, quantized_name(model, scheme), version,
        config=base["config"], run_id=base.get("run_id"), data_version=base.get("data_version"),
        header_metadata=quantize.metadata_for_safetensors(qs),
        metadata={"quantization": qs.metadata, "base": {"model": model, "version": version}, "skipped": qs.skipped,
                  "size_ratio": qs.ratio},
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
) -> dict:
    """Publish each scheme of ``model/version``, measure the held-out accuracy of what was
    published (dequantized on load) against the base, and list every scheme whose drop exceeds its
    limit. The base version is read and verified once. Returns ``{"base_accuracy", "variants":
    {scheme: {model, version, accuracy, drop_points, size_ratio, bytes, skipped, seconds,
    tensor_seconds}}, "failures"}`` (``seconds``: quantize, publish and evaluate the scheme;
    ``tensor_seconds``: per quantized tensor)."""
    manifest = export.read_manifest(store, model, version)
    state = export.load_state_dict(store, model, version)
    base = evaluate(export.module_from_state(manifest, state), test_shards, spec).accuracy
    variants, failures = {}, []
    for scheme in schemes:
        t0 = time.perf_counter()
        pub = publish_quantized(store, model, version, scheme, group_size=group_size, symmetric=symmetric, state=state)
        qname = quantized_name(model, scheme)
        acc = evaluate(load_quantized_module(store, qname, version), test_shards, spec).accuracy
        drop, limit = 100 * (base - acc), max_drop_points[scheme]
        if drop > limit:
            failures.append(f"{scheme}: accuracy {acc:.4f} is {drop:.2f} points below {base:.4f} (limit {limit})")
        variants[scheme] = {"model": qname, "version": version, "accuracy": acc, "drop_points": drop,
                            "size_ratio": pub["ratio"], "bytes": pub["manifest"]["bytes"], "skipped": pub["skipped"],
                            "seconds": time.perf_counter() - t0, "tensor_seconds": pub["tensor_seconds"],
                            "reused": pub["reused"]}
    return {"base_accuracy": base, "variants": variants, "failures": failures}
