"""Training assets: ``preprocessed`` (the DALI-fed dataset over every ingested batch) and
``trained_model`` (torchrun DDP training with checkpoints that survive a kill)."""

import hashlib
import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal, Optional

import dagster as dg
from pydantic import Field

from assets.ingest import raw_shards
from pipeline import dataset as ds
from pipeline import metrics, preprocess, settings, train
from pipeline.k8s import manifests as k8s_manifests
from pipeline.k8s import runner as k8s_runner
from resources.gpu import GpuPoolResource
from resources.storage import StorageResource

# Dagster's open_pipes_session reads its own preview PipesMessageReader.expected_writer_count and the
# deprecated AssetExecutionContext.run_id (nothing of ours calls either): keep those two quiet.
warnings.filterwarnings("ignore", category=dg.PreviewWarning, message=r".*PipesMessageReader\.expected_writer_count",
                        module=r"dagster\._core\.pipes\.context")
warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"AssetExecutionContext\.run_id is deprecated",
                        module=r"dagster\._core\.pipes\.context")
GPU_POOL = settings.gpu_pool()  # Dagster concurrency pool: GPU steps never oversubscribe it (limit in dagster.yaml)


def shard_cache_dir() -> Path:
    return settings.home() / "cache" / "shards"


class PreprocessConfig(dg.Config):
    resize_shorter: int = Field(default=32, ge=1, description="Resize so the shorter side has this many pixels.")
    crop: int = Field(default=28, ge=1, description="Square crop fed to the model (random when training, center otherwise).")
    random_flip: bool = Field(default=False, description="Horizontal flips (off for digits).")
    batch_size: int = Field(default=128, ge=1, description="Batch size for the throughput measurement.")


@dg.asset(deps=[raw_shards], group_name="train", kinds={"dali"}, pool=GPU_POOL)
def preprocessed(
    context: dg.AssetExecutionContext, config: PreprocessConfig, storage: StorageResource, gpu_pool: GpuPoolResource
) -> dict:
    """Every published shard grouped by split, the preprocessing spec with normalization statistics
    computed through DALI, and a measured pass of the training pipeline (images/s, stall time)."""
    store = storage.client()
    data = ds.collect(store)
    local = ds.stage_all(store, data, shard_cache_dir())
    spec = preprocess.PreprocessSpec(resize_shorter=config.resize_shorter, crop=config.crop, random_flip=config.random_flip)
    mean, std = preprocess.normalization_stats(local["train"], spec=spec)
    spec = replace(spec, mean=tuple(mean), std=tuple(std))
    with gpu_pool.lease(f"preprocessed:{context.run.run_id}") as lease, preprocess.WebDatasetLoader(
        local["train"], batch_size=config.batch_size, spec=spec, training=True,
        device="gpu" if lease.device_type == "cuda" else "cpu", lookahead=False,
        device_id=lease.devices[0].index if lease.devices else None,
    ) as loader, gpu_pool.sampler(lease) as sampler:
        for _ in loader.epoch(0):  # one timed pass: what training will see
            pass
        stats = dict(loader.stats)
    util = sampler.summary()
    context.add_output_metadata({
        "dataset_version": data["version"],
        "batches": dg.MetadataValue.json(data["batches"]),
        "samples_train": data["samples"]["train"],
        "samples_val": data["samples"]["val"],
        "samples_test": data["samples"]["test"],
        "seconds": stats["seconds"],
        "images_per_s": stats["images_per_s"],
        "stall_seconds": stats["stall_seconds"],
        **metrics.summary(stats["batch_seconds"], "batch_latency"),
        **{k: float(v) for k, v in util.items()},
        "device": lease.device_type,
        "mean": dg.MetadataValue.json(list(mean)),
        "std": dg.MetadataValue.json(list(std)),
    })
    return {"dataset": data, "spec": asdict(spec)}


class TrainingConfig(dg.Config):
    epochs: int = Field(default=15, ge=1)
    lr: float = Field(default=1e-2, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    batch_size: int = Field(default=64, ge=1, description="Per rank, per micro-batch.")
    accumulation: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    amp: Literal["auto", "bf16", "fp16", "fp32"] = Field(default="auto", description="auto (bf16 where supported, else fp16+GradScaler) | bf16 | fp16 | fp32")
    seed: int = Field(default=0, ge=0)
    model: Literal["digits_cnn", "resnet50"] = Field(default="digits_cnn", description="Architecture (pipeline/models.py).")
    fresh: bool = Field(default=False, description="Ignore checkpoints of an earlier identical run and start over.")
    run_timeout_s: float = Field(default=3600, gt=0, description="Wall-clock limit for the whole training run.")
    collective_timeout_s: float = Field(default=120, gt=0, description="gloo/NCCL timeout: a dead rank fails the run.")
    min_accuracy: float = Field(default=0.97, ge=0, le=1, description="Held-out (test split) accuracy the check requires.")
    time_budget_s: float = Field(default=120, gt=0, description="Training time the WARN check allows.")
    nodes: int = Field(default=1, ge=1, description="Machines for this run: > 1 runs one torchrun node per Kubernetes "
                                              "pod (an Indexed Job, see deploy/README.md); 1 trains in this step.")
    gpus_per_node: Optional[int] = Field(default=None, ge=0, description="nodes > 1: GPUs per node pod; None = the GPU "
                                                                   "pool's gpus_per_run (else 1); 0 = CPU nodes.")
    node_image: Optional[str] = Field(default=None, description="nodes > 1: node pod image; None = $FORGELINE_IMAGE.")
    node_namespace: Optional[str] = Field(default=None, description="nodes > 1: namespace; None = this pod's.")
    rdzv_port: int = Field(default=29500, ge=1, le=65535, description="nodes > 1: c10d rendezvous port on node 0.")


def training_curves(hist: list[dict]) -> str:
    """Markdown with the per-epoch loss and accuracy as inline SVG charts (the UI draws them; a
    Markdown image with a data URI is what Dagster's Markdown metadata renders)."""
    def col(key: str) -> list:
        return [h.get(key) for h in hist]

    loss = {k: col(k) for k in ("train_loss", "val_loss") if any(h.get(k) is not None for h in hist)}
    acc = {k: col(k) for k in ("train_acc", "val_acc") if any(h.get(k) is not None for h in hist)}
    charts = [metrics.svg_markdown(metrics.line_chart_svg(loss, title="loss per epoch"), "loss per epoch")]
    if acc:
        charts.append(metrics.svg_markdown(metrics.line_chart_svg(acc, title="accuracy per epoch"),
                                           "accuracy per epoch"))
    return "\n\n".join(charts)


def _run_name(config: TrainingConfig, data_version: str, run_id: str, spec: dict) -> str:
    """Same config + same data + same preprocessing → same checkpoint prefix, so a re-run resumes
    instead of restarting. The preprocessing spec (crop, resize, normalisation: what the model
    sees, and its input channels) is part of it: a checkpoint of crop 28 is no start for crop 20."""
    keys = ("epochs", "lr", "weight_decay", "batch_size", "accumulation", "amp", "seed", "model")
    ident = json.dumps({k: getattr(config, k) for k in keys} | {"data": data_version, "spec": spec}, sort_keys=True)
    suffix = f"-{run_id[:8]}" if config.fresh else ""
    return f"{config.model}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}{suffix}"


@dg.asset(
    group_name="train",
    kinds={"pytorch"},
    pool=GPU_POOL,
    check_specs=[
        dg.AssetCheckSpec("held_out_accuracy", asset="trained_model", blocking=True,
                          description="Test-split accuracy ≥ min_accuracy (a gate for packaging)."),
        dg.AssetCheckSpec("trained_within_budget", asset="trained_model",
                          description="Training wall time ≤ time_budget_s (WARN)."),
    ],
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    preprocessed: dict,
    storage: StorageResource,
    gpu_pool: GpuPoolResource,
):
    """DDP training via torchrun over the leased GPUs (or CPU ranks), resuming from the last
    checkpoint of an identical earlier run; rank 0 alone checkpoints, logs each epoch's metrics to
    this run through Dagster Pipes, and returns the result recorded as metadata."""
    store = storage.client()
    data = preprocessed["dataset"]
    run_name = _run_name(config, data["version"], context.run.run_id, preprocessed["spec"])
    tcfg = train.TrainConfig(
        epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay, batch_size=config.batch_size,
        accumulation=config.accumulation, amp=config.amp, seed=config.seed, model=config.model,
        model_kwargs={"in_channels": len(preprocessed["spec"]["mean"])},
        collective_timeout_s=config.collective_timeout_s,
    )
    if config.nodes > 1:  # torchrun pods on the cluster (pipeline.k8s); this step only waits for them
        gpus = config.gpus_per_node if config.gpus_per_node is not None else (gpu_pool.gpus_per_run or 1)
        result, util = k8s_runner.train_on_nodes(
            store, dataset=data, spec=preprocessed["spec"], config=tcfg, checkpoint_prefix=f"checkpoints/{run_name}",
            run_id=context.run.run_id, nnodes=config.nodes, device_type="cuda" if gpus else "cpu",
            requirements=k8s_manifests.merge(gpu_pool.k8s_config(gpus), k8s_manifests.model_store_access_from_env()),
            run_timeout_s=config.run_timeout_s, image=config.node_image, namespace=config.node_namespace,
            rdzv_port=config.rdzv_port, on_line=context.log.info), {}
    else:
        # rank 0 logs every epoch through Pipes: the lines reach the event log while training runs
        with gpu_pool.lease(f"trained_model:{context.run.run_id}") as lease, gpu_pool.sampler(lease) as sampler, \
                dg.open_pipes_session(context=context, context_injector=dg.PipesTempFileContextInjector(),
                                      message_reader=dg.PipesTempFileMessageReader()) as pipes:
            tcfg.check_before_launch(data.get("samples", {}).get("train"), lease.world_size, lease.device_type)
            result = train.launch(
                storage=store, shards=ds.stage_all(store, data, shard_cache_dir()), spec=preprocessed["spec"],
                config=tcfg, checkpoint_prefix=f"checkpoints/{run_name}", world_size=lease.world_size,
                device_type=lease.device_type, env={**lease.env(), **pipes.get_bootstrap_env_vars()},
                run_timeout_s=config.run_timeout_s,
            )
        util = sampler.summary()
    hist = result.history
    train_seconds = sum(h["seconds"] for h in hist)
    record = {
        "run_name": run_name,
        "run_id": context.run.run_id,
        "checkpoint": result.checkpoint,
        "checkpoint_sha256": result.checkpoint_sha256,
        "model": {"name": tcfg.model, "kwargs": tcfg.model_kwargs},
        "spec": preprocessed["spec"],
        "dataset_version": data["version"],
        "dataset": data,
        "test_acc": result.test_acc,
        "val_acc": result.val_acc,
    }
    yield dg.Output(record, metadata={
        "test_accuracy": result.test_acc,
        "val_accuracy": result.val_acc,
        "best_val_accuracy": result.best_val_acc,
        "final_train_loss": hist[-1]["train_loss"],
        "curves": dg.MetadataValue.md(training_curves(hist)),  # per-epoch loss and accuracy, as charts
        **metrics.summary((h["seconds"] for h in hist), "epoch_latency"),  # floats: plotted across runs
        "samples_per_s": sum(h["samples_per_s"] for h in hist) / len(hist),
        "train_seconds": train_seconds,
        "wall_seconds": result.seconds,
        "seconds": result.seconds,
        **{k: v for k, v in result.extra.items() if k.startswith("step_latency_")},
        "world_size": result.world_size,
        "amp_dtype": result.amp_dtype,
        "device": result.device_type,
        "epochs": len(hist),
        "resumed_from_epoch": result.resumed_from_epoch or 0,
        "checkpoint": dg.MetadataValue.path(store.uri(result.checkpoint)),
        **{k: float(v) for k, v in util.items()},
    })
    yield dg.AssetCheckResult(
        check_name="held_out_accuracy",
        passed=result.test_acc is not None and result.test_acc >= config.min_accuracy,
        description=f"test accuracy {result.test_acc or 0.0:.4f}, min_accuracy {config.min_accuracy}",
        metadata={"test_accuracy": result.test_acc or 0.0, "min_accuracy": config.min_accuracy},
    )
    yield dg.AssetCheckResult(
        check_name="trained_within_budget",
        passed=result.seconds <= config.time_budget_s,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"wall_seconds": result.seconds, "budget_s": config.time_budget_s},
    )
