"""Packaging assets: ``exported_model`` (chunked safetensors, immutable versions, golden outputs),
``quantized_model`` (int8 / int4 weight-only, behind a blocking accuracy gate), ``promoted_model``
(the production alias, moved only past both blocking checks) and ``compile_artifacts``
(torch.compile mega-cache in the compile cache)."""

import time
from typing import Literal, Optional

import dagster as dg
from pydantic import Field, field_validator

from assets.train import GPU_POOL, shard_cache_dir
from pipeline import dataset as ds
from pipeline import compile_cache, export, metrics, package, promotion, quantize, settings
from pipeline.serving import loader as serving_loader
from pipeline.serving.registry import ServeConfig
from resources.cache import CompileCacheResource
from resources.gpu import GpuPoolResource
from resources.storage import StorageResource



class ExportConfig(dg.Config):
    model_name: str = Field(default=settings.model_name(), description="Published name: versions live at "
                            "models/<name>/<version>/ (default: $FORGELINE_MODEL_NAME, else 'digits').")
    max_shard_bytes: int = Field(default=2 * 1024**3, ge=1, description="Largest shard file (tensors are never split).")
    dtype: Optional[str] = Field(default=None, description="Cast floating tensors on export: bfloat16 | float16 | "
                                 "float32 | float64 (None keeps them).")
    max_regression_points: float = Field(default=1.0, ge=0, description=(
        "Gate not_worse_than_production: the most held-out accuracy points this version may be below the "
        "production version (both evaluated on this version's test split) and still go on to promotion."))

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v):  # Dagster config cannot express Optional[Literal]
        if v is not None and v not in ("bfloat16", "float16", "float32", "float64"):
            raise ValueError("must be one of bfloat16, float16, float32, float64 (or null)")
        return v


@dg.asset(
    group_name="package",
    kinds={"safetensors"},
    check_specs=[
        dg.AssetCheckSpec("loads_back_bit_exact", asset="exported_model", blocking=True,
                          description="Every shard verifies (size, sha256), every tensor equals the trained one, "
                                      "outputs on a fixed batch match."),
        dg.AssetCheckSpec("not_worse_than_production", asset="exported_model", blocking=True,
                          description="Held-out accuracy no more than max_regression_points below the production "
                                      "version's on the same test split: a retrain that came out worse is not "
                                      "promoted, and production stays where it was."),
    ],
)
def exported_model(context: dg.AssetExecutionContext, config: ExportConfig, trained_model: dict, storage: StorageResource):
    """The trained weights as an immutable, chunked safetensors version with its golden outputs,
    streamed from the checkpoint (the same weights exported the same way reuse their version)."""
    store = storage.client()
    arch = trained_model["model"]
    test_shards = ds.stage(store, trained_model["dataset"]["splits"]["test"], shard_cache_dir())
    result = package.export_trained(
        store, config.model_name, checkpoint=trained_model["checkpoint"],
        checkpoint_sha256=trained_model["checkpoint_sha256"], architecture=arch["name"], model_kwargs=arch["kwargs"],
        spec=trained_model["spec"], check_shards=test_shards,
        run_id=trained_model["run_id"], data_version=trained_model["dataset_version"],
        batches=trained_model["dataset"]["batches"], dtype=config.dtype, max_shard_bytes=config.max_shard_bytes,
    )
    manifest, reused, seconds, problems = result["manifest"], result["reused"], result["seconds"], result["problems"]
    if reused:
        context.log.info(f"{config.model_name}/{manifest['version']} already holds these weights: reused it")
    version = manifest["version"]
    gate = {"passed": not problems, "value": len(problems), "limit": 0, "unit": "problems", "problems": problems}
    # a version that does not load back bit-exact is rejected already: no comparison to make
    versus = None if problems else package.compare_with_production(
        store, config.model_name, version, test_shards, trained_model["spec"],
        max_regression_points=config.max_regression_points)
    yield dg.Output(
        {"model": config.model_name, "version": version, "config": manifest["config"], "spec": trained_model["spec"],
         "dataset": trained_model["dataset"], "run_id": trained_model["run_id"],
         "gates": {"loads_back_bit_exact": gate, **({"not_worse_than_production": versus} if versus else {})}},
        metadata={
            "version": version,
            "reused": reused,
            "manifest": dg.MetadataValue.path(store.uri(export.version_prefix(config.model_name, version) + "/manifest.json")),
            "shards": len(manifest["shards"]),
            "tensors": manifest["tensors"],
            "total_bytes": manifest["total_size"],
            "dtypes": dg.MetadataValue.json(manifest["dtypes"]),
            "golden": "golden" in manifest,
            "seconds": seconds,
            **({} if reused else {  # a reused version wrote nothing: no throughput to report
                "mb_per_s": manifest["bytes"] / 1e6 / max(seconds, 1e-9),
                **metrics.summary((s["seconds"] for s in manifest["shards"]), "shard_latency")}),
        },
    )
    yield dg.AssetCheckResult(check_name="loads_back_bit_exact", passed=not problems,
                              description="; ".join(problems)[:1000] or None,
                              metadata={"problems": dg.MetadataValue.json(problems)})
    if versus is None:
        versus = {"passed": False, "reason": "not compared: the version failed loads_back_bit_exact"}
    yield dg.AssetCheckResult(
        check_name="not_worse_than_production", passed=versus["passed"], description=versus["reason"],
        metadata={k: versus[k] for k in ("accuracy", "production_accuracy", "production_version", "samples")
                  if versus.get(k) is not None}
        | ({"points_below": versus["value"]} if versus.get("production_accuracy") is not None else {}))


def known_schemes(v: list[str], what: str = "scheme") -> list[str]:
    """A pydantic check for a list of quantization schemes (Dagster config cannot express
    ``list[Literal]``): each must be one of :data:`pipeline.quantize.SCHEMES`."""
    if bad := [s for s in v if s not in quantize.SCHEMES]:
        raise ValueError(f"unknown {what}(s) {bad}: use {', '.join(quantize.SCHEMES)}")
    return v


class QuantizeConfig(dg.Config):
    schemes: list[str] = Field(default=["int8", "int4"], description="Weight-only schemes to publish: int8, int4.")
    group_size: int = Field(default=128, ge=1, description="int4 group size along the input dimension.")
    symmetric: bool = Field(default=True, description="int4 without zero points.")
    max_drop_int8: float = Field(default=0.5, ge=0, description="Allowed held-out accuracy drop, points.")
    max_drop_int4: float = Field(default=2.0, ge=0, description="Allowed held-out accuracy drop, points.")
    min_accuracy: float = Field(default=0.0, ge=0, le=1, description="Held-out accuracy every variant must reach (0..1).")

    @field_validator("schemes")
    @classmethod
    def _known_schemes(cls, v):
        return known_schemes(v)


@dg.asset(
    group_name="package",
    kinds={"safetensors"},
    check_specs=[dg.AssetCheckSpec(
        "accuracy_gate", asset="quantized_model", blocking=True,
        description="Held-out accuracy drop vs the exported model within max_drop_* points (deployment gate).")],
)
def quantized_model(context: dg.AssetExecutionContext, config: QuantizeConfig, exported_model: dict, storage: StorageResource):
    """int8/int4 weight-only versions of the exported model, published beside it, with their size
    ratio and held-out accuracy. The blocking gate stops everything downstream if accuracy drops."""
    store = storage.client()
    name, version = exported_model["model"], exported_model["version"]
    t0 = time.perf_counter()
    result = package.quantize_and_gate(
        store, name, version, ds.stage(store, exported_model["dataset"]["splits"]["test"], shard_cache_dir()),
        exported_model["spec"], schemes=config.schemes, group_size=config.group_size, symmetric=config.symmetric,
        max_drop_points={"int8": config.max_drop_int8, "int4": config.max_drop_int4},
        min_accuracy=config.min_accuracy,
    )
    seconds = time.perf_counter() - t0
    tensor_seconds = [s for v in result["variants"].values() for s in v["tensor_seconds"]]
    metadata = {"base_accuracy": result["base_accuracy"], "seconds": seconds,
                **({"tensors_per_s": len(tensor_seconds) / max(sum(tensor_seconds), 1e-9)} if tensor_seconds else {}),
                **metrics.summary(tensor_seconds, "tensor_latency")}
    for scheme, v in result["variants"].items():
        metadata.update({f"{scheme}_accuracy": v["accuracy"], f"{scheme}_drop_points": v["drop_points"],
                         f"{scheme}_size_ratio": v["size_ratio"], f"{scheme}_bytes": v["bytes"],
                         f"{scheme}_seconds": v["seconds"], f"{scheme}_reused": v["reused"],
                         f"{scheme}_kept_full_precision": dg.MetadataValue.json(v["skipped"])})
    variants = {s: {k: v[k] for k in ("model", "version", "accuracy", "size_ratio")} for s, v in result["variants"].items()}
    yield dg.Output({"base": {"model": name, "version": version}, "variants": variants, "gates": result["gates"]},
                    metadata=metadata)
    yield dg.AssetCheckResult(check_name="accuracy_gate", passed=not result["failures"],
                              description="; ".join(result["failures"]) or None,
                              metadata={"failures": dg.MetadataValue.json(result["failures"]),
                                        "base_accuracy": result["base_accuracy"]})


@dg.asset(group_name="package", kinds={"json"})
def promoted_model(context: dg.AssetExecutionContext, exported_model: dict, quantized_model: dict,
                   storage: StorageResource) -> dg.Output:
    """The exported version (and its quantized variants) made production: the alias
    ``models/<model>/production`` that the pre-warm, the drift reference and serving follow.
    Downstream of both blocking checks (bit-exact export, quantization gate): a failed gate stops
    this step, so production stays where it was."""
    store = storage.client()
    name, version = exported_model["model"], exported_model["version"]
    gates = {**exported_model["gates"], **quantized_model["gates"]}
    reason = f"passed {', '.join(sorted(gates))}"
    record = promotion.promote(store, name, version, run_id=context.run.run_id, gates=gates, reason=reason)
    variants = {}
    for scheme, v in quantized_model["variants"].items():
        variants[scheme] = promotion.promote(store, v["model"], v["version"], run_id=context.run.run_id,
                                             gates={"accuracy_gate": gates[f"accuracy_gate.{scheme}"]}, reason=reason)
    return dg.Output(
        {"model": name, "version": version, "previous": record["previous"],
         "variants": {s: {"model": r["model"], "version": r["version"]} for s, r in variants.items()}},
        metadata={"version": version, "previous": record["previous"] or "", "promoted_at": record["promoted_at"],
                  "gates": dg.MetadataValue.json(gates),
                  "alias": dg.MetadataValue.path(store.uri(export.version_prefix(name, promotion.ALIAS)))},
    )


class CompileConfig(dg.Config):
    batch_size: int = Field(default=ServeConfig.max_batch_size, ge=1, le=4096, description=(
        "Largest batch the compiled program serves (batches 1..this): the servers' --max-batch-size, "
        "so their --compile finds this package in the compile cache."))
    mode: Literal[compile_cache.COMPILE_MODES] = Field(default="default", description="torch.compile mode: " + (
        " | ".join(compile_cache.COMPILE_MODES)))


@dg.asset(group_name="package", kinds={"pytorch"}, pool=GPU_POOL, deps=[quantized_model])
def compile_artifacts(
    context: dg.AssetExecutionContext, config: CompileConfig, exported_model: dict, storage: StorageResource,
    compile_cache: CompileCacheResource, gpu_pool: GpuPoolResource,
):
    """The exported version loaded and compiled exactly as ``forgeline serve --compile`` will (an
    AOTInductor package keyed by the architecture, batch range, device and software versions; weights
    bound at load), through the compile cache, and its golden outputs reproduced by the compiled
    program. A server on the same device type then starts on a cache hit. Downstream of the
    quantization gate, so a failed gate leaves nothing to deploy."""
    store = storage.client()
    cache = compile_cache.cache()
    name, version = exported_model["model"], exported_model["version"]
    with gpu_pool.lease(f"compile_artifacts:{context.run.run_id}") as lease:
        device = f"cuda:{lease.devices[0].index}" if lease.devices else "cpu"
        loaded = serving_loader.load_version(store, name, version, device=device, cache=cache, compile=True,
                                             compile_mode=config.mode, max_batch_size=config.batch_size)
    info = loaded.compile or {}
    golden = loaded.golden
    serving_loader.release(loaded)
    for w in info.get("warnings", []):
        context.log.warning(w)
    ops = info.get("step_seconds", {})
    transfer_s = ops.get("fetch", 0.0) + ops.get("load", 0.0) if info.get("hit") else ops.get("save", 0.0)
    return dg.MaterializeResult(metadata={
        "hit": bool(info.get("hit")),
        "kind": info.get("kind") or "",
        "key": info.get("key") or "",
        "backend": cache.describe(),
        "seconds": info.get("seconds", 0.0),
        **{f"{op}_seconds": s for op, s in ops.items()},
        "mb_per_s": info.get("bytes", 0) / 1e6 / transfer_s if transfer_s > 0 else 0.0,
        **metrics.summary(ops.values(), "op_latency"),
        "artifact_bytes": info.get("bytes", 0),
        "device": device,
        "batch_sizes": f"1..{config.batch_size}",
        "golden_max_abs_diff": float(golden.get("max_abs_diff", 0.0)),
        "warnings": dg.MetadataValue.json(info.get("warnings", [])),
        "miss_reason": info.get("miss_reason") or "",
        "fallback_reason": info.get("fallback_reason") or "",
        "model_version": f"{name}/{version}",
    })
