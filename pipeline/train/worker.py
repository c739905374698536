"""One rank of a training run, started by torchrun as ``python -m pipeline.train.worker JOB`` (the
job file :func:`pipeline.train.launcher.launch` writes).

It reads top to bottom: :func:`build` (process group, data, model, optimizer, resume from the
latest checkpoint), then for each epoch :func:`train_epoch`, :func:`evaluate` on val and
:func:`end_epoch` (rank 0 checkpoints and reports), then :func:`finish` (held-out evaluation, every
rank's parameter hash, the result file). DDP over NCCL (GPUs) or gloo (CPU ranks), DALI data sharded
by rank, ``torch.autocast`` (bf16 where supported, else fp16 + GradScaler), gradient accumulation.

Determinism: every epoch reseeds torch from ``(seed, epoch, rank)`` and asks the loader for that
epoch's data, a pure function of ``(seed, epoch, rank)``; a run resumed from the epoch-``k``
checkpoint replays epoch ``k+1`` exactly and ends with the weights of an uninterrupted run (on CPU;
GPU kernels may differ in the last bits).

Progress: rank 0 prints a line per epoch and, when the environment carries a Dagster Pipes session
(``DAGSTER_PIPES_CONTEXT``, set by the asset), logs the epoch's metrics through Pipes as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import settings
from pipeline.metrics import summary as latency_summary
from pipeline.models import build_model
from pipeline.preprocess import PreprocessSpec, WebDatasetLoader
from pipeline.storage import Storage, from_spec, write_file_atomic
from pipeline.train.checkpoints import CHECKPOINT_FORMAT, latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.train.config import TrainConfig, TrainingFailed
from pipeline.train.launcher import die_with_parent

# What the per-epoch Pipes log line shows (the row has more: step latency percentiles, stall time).
PROGRESS_KEYS = ("train_loss", "val_loss", "val_acc", "samples_per_s", "seconds")


@dataclass
class Run:
    """Everything :func:`build` sets up for this rank, and the history the epochs add to."""

    job: dict
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    store: Storage
    prefix: str
    amp_dtype: torch.dtype | None
    model: nn.Module
    ddp: DDP
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_loader: Any
    evals: dict
    steps_per_epoch: int
    opt_steps_total: int
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    step_seconds: list[float] = field(default_factory=list)  # every optimizer step this run took
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"


def main(job_path: str) -> None:
    die_with_parent()  # torchrun's agent SIGKILLed: this rank goes too
    job = json.loads(Path(job_path).read_text())
    with pipes_reporter(int(os.environ["RANK"])) as pipes:
        run = build(job)
        if run.start_epoch and run.rank == 0:
            print(f"[forgeline] resuming from {run.prefix} epoch {run.start_epoch}", flush=True)
            if pipes is not None:
                pipes.log.info(f"resuming from {run.prefix} epoch {run.start_epoch}")
        for epoch in range(run.start_epoch, run.cfg.epochs):
            row = train_epoch(run, epoch)
            if not math.isfinite(row["train_loss"]):  # all-reduced: every rank stops here, none checkpoints it
                raise TrainingFailed(f"train_loss is {row['train_loss']} in epoch {epoch + 1}: the training diverged "
                                     f"(lr={run.cfg.lr:g}, amp {run.cfg.amp}); lower lr or use amp fp32")
            if "val" in run.evals:
                v = evaluate(run, run.evals["val"])
                row.update(val_loss=v["loss"], val_acc=v["acc"])
            end_epoch(run, row, pipes)
        finish(run)


def build(job: dict) -> Run:
    """Join the process group, open the data, build model, optimizer and schedule, and resume from
    the newest checkpoint under the job's prefix (if any)."""
    cfg = TrainConfig(**job["config"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = job["device_type"] == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    threads = cfg.num_threads or max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    torch.set_num_threads(threads)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo", timeout=timedelta(seconds=cfg.collective_timeout_s),
        device_id=device if use_cuda else None,
    )
    amp_dtype, use_scaler = resolve_amp(cfg.amp, device.type)

    if job.get("synthetic"):  # benchmarks: the trainer's own cost, no data pipeline
        train_loader, evals = SyntheticLoader(batch_size=cfg.batch_size, device=device, **job["synthetic"]), {}
    else:
        spec = PreprocessSpec(**job["spec"])
        loader_kw = dict(batch_size=cfg.batch_size, spec=spec, shard_id=rank, num_shards=world,
                         device="gpu" if use_cuda else "cpu", device_id=local_rank if use_cuda else None,
                         num_threads=threads, seed=cfg.seed)
        train_loader = WebDatasetLoader(job["shards"]["train"], training=True, **loader_kw)
        evals = {s: WebDatasetLoader(job["shards"][s], training=False, **loader_kw)
                 for s in ("val", "test") if job["shards"].get(s)}

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, **cfg.model_kwargs).to(device)
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    ddp = DDP(model, device_ids=[local_rank] if use_cuda else None)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer must be adamw or sgd, got {cfg.optimizer!r}")
    # Every rank runs the same number of steps (ranks' shares can differ by a sample or two);
    # unequal counts would leave one rank waiting in allreduce forever.
    steps = torch.tensor(len(train_loader), device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    steps_per_epoch = int(steps)
    opt_steps_total = max(1, cfg.epochs * steps_per_epoch // cfg.accumulation)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=opt_steps_total, pct_start=0.15)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    run = Run(job=job, cfg=cfg, rank=rank, world=world, device=device, store=from_spec(job["storage"]),
              prefix=job["checkpoint_prefix"], amp_dtype=amp_dtype, model=model, ddp=ddp, opt=opt, sched=sched,
              scaler=scaler, train_loader=train_loader, evals=evals, steps_per_epoch=steps_per_epoch,
              opt_steps_total=opt_steps_total)

    ckpt = load_checkpoint(run.store, run.prefix)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        run.history = json.loads(ckpt["history"])
        run.start_epoch = int(ckpt["epoch"])
    return run


def train_epoch(run: Run, epoch: int) -> dict:
    """One epoch over this rank's share, reseeded from ``(seed, epoch, rank)``. Returns the epoch's
    row: loss and samples/s over all ranks, this rank's optimizer-step latencies."""
    cfg, device = run.cfg, run.device
    torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + run.rank)
    random.seed(cfg.seed * 1_000_003 + epoch * 1009 + run.rank)
    run.model.train()
    t0 = time.perf_counter()
    marks = [_step_mark(run.use_cuda)]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for step, (x, y) in enumerate(run.train_loader.epoch(epoch)):
        if step >= run.steps_per_epoch:
            break
        _fault(run.rank, epoch, step)
        if run.use_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        last_micro = (step + 1) % cfg.accumulation == 0 or step + 1 == run.steps_per_epoch
        ctx = run.ddp.no_sync() if not last_micro else contextlib.nullcontext()
        with ctx:
            with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
                loss = run.loss_fn(run.ddp(x).float(), y)
            run.scaler.scale(loss / cfg.accumulation).backward()
        if last_micro:
            run.scaler.step(run.opt)
            run.scaler.update()
            run.opt.zero_grad(set_to_none=True)
            if run.sched.last_epoch + 1 < run.opt_steps_total:
                run.sched.step()
            marks.append(_step_mark(run.use_cuda))
        loss_sum += loss.detach().double() * len(y)
        seen += len(y)
    counts = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
    dist.all_reduce(counts)
    if run.use_cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    # per optimizer step, data wait included (the first one also waits for the epoch's pipeline)
    epoch_steps = [a.elapsed_time(b) / 1e3 if run.use_cuda else b - a for a, b in zip(marks, marks[1:])]
    run.step_seconds += epoch_steps
    return {"epoch": epoch + 1, "train_loss": float(counts[0] / counts[1]), "seconds": secs,
            "samples_per_s": float(counts[1]) / secs, "stall_seconds": run.train_loader.stats.get("stall_seconds", 0.0),
            **latency_summary(epoch_steps, "step_latency")}


def evaluate(run: Run, loader) -> dict:
    """Mean loss and accuracy over every rank's share of ``loader`` (each sample counted once)."""
    model, device, amp_dtype = run.model, run.device, run.amp_dtype
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for x, y in loader.epoch(0):
            out = model(x)
            totals += torch.stack([run.loss_fn(out.float(), y) * len(y), (out.argmax(1) == y).sum(),
                                   torch.tensor(len(y), device=device)]).double()
    dist.all_reduce(totals)
    model.train()
    return {"loss": float(totals[0] / totals[2]), "acc": float(totals[1] / totals[2]), "samples": int(totals[2])}


def end_epoch(run: Run, row: dict, pipes) -> None:
    """Add the epoch to the history; rank 0 checkpoints it and reports it (stdout, and Pipes when
    connected). Nobody starts the next epoch before the checkpoint is published."""
    run.history.append(row)
    if run.rank == 0:
        state = {
            "format": CHECKPOINT_FORMAT, "epoch": row["epoch"], "model": run.model.state_dict(),
            "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(), "scaler": run.scaler.state_dict(),
            "rng_torch": torch.get_rng_state(), "history": json.dumps(run.history), "config": json.dumps(asdict(run.cfg)),
        }
        save_checkpoint(run.store, run.prefix, state, run.cfg.keep_checkpoints)
        progress = f"epoch {row['epoch']}/{run.cfg.epochs}"
        print(f"[forgeline] {progress} " + " ".join(
            f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float)), flush=True)
        if pipes is not None:
            pipes.log.info(f"{progress}: " + " ".join(f"{k}={row[k]:.4g}" for k in PROGRESS_KEYS if k in row))
    dist.barrier()


def finish(run: Run) -> None:
    """Held-out evaluation over all ranks, every rank's parameter hash, and rank 0's result file
    (what :func:`pipeline.train.launcher.launch` returns); then leave the process group."""
    amp = str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "fp32"
    result = {"history": run.history, "world_size": run.world, "amp_dtype": amp, "device_type": run.device.type,
              "resumed_from_epoch": run.start_epoch or None, **latency_summary(run.step_seconds, "step_latency")}
    for split, loader in run.evals.items():
        m = evaluate(run, loader)
        result[f"{split}_acc"], result[f"{split}_loss"], result[f"{split}_samples"] = m["acc"], m["loss"], m["samples"]
    # Each rank hashes its own parameters and rank 0 reports them all: proof that every rank (on
    # every node) ended with the same weights, without shipping weights between nodes.
    result["rank_params_sha256"] = [None] * run.world
    dist.all_gather_object(result["rank_params_sha256"], params_sha256(run.model.named_parameters()))
    if run.cfg.save_rank_weights:
        torch.save({k: v.detach().cpu() for k, v in run.model.named_parameters()},
                   Path(run.job["work_dir"]) / f"rank{run.rank}.pt")
    if run.rank == 0:
        ptr = latest_checkpoint(run.store, run.prefix)
        result["checkpoint"] = ptr["key"] if ptr else None
        result["checkpoint_sha256"] = ptr["sha256"] if ptr else None
        write_file_atomic(run.job["result_path"], json.dumps(result, indent=1), durable=False)
    # No rank tears its connections down while another may still use them: once, in a run that
    # resumed at its last epoch (nothing to train, so the ranks reached here at once), gloo aborted
    # the rank that left first ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------


def resolve_amp(amp: str, device_type: str):
    """``(autocast dtype or None, use GradScaler)`` for the requested mode on this device."""
    if amp not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"amp must be auto, bf16, fp16 or fp32, got {amp!r}")
    if amp == "fp32":
        return None, False
    if amp == "auto":
        if device_type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16"  # CPU autocast supports bf16 only
    if amp == "fp16" and device_type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 or fp32 on CPU")
    return (torch.bfloat16, False) if amp == "bf16" else (torch.float16, True)


def params_sha256(named_tensors) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in order: equal hashes, equal weights."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class SyntheticLoader:
    """Random input already on the device, same shape every step: measures the training step
    (model, DDP, AMP, optimizer, metrics) without any data pipeline, like the public numbers."""

    def __init__(self, *, samples: int, shape: list[int], classes: int, batch_size: int, device, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self._x = torch.randn(batch_size, *shape, generator=g).to(device)
        self._y = torch.randint(0, classes, (batch_size,), generator=g).to(device)
        self._steps = max(1, samples // batch_size)
        self.stats: dict = {}

    def __len__(self) -> int:
        return self._steps

    def epoch(self, epoch: int):
        for _ in range(self._steps):
            yield self._x, self._y


@contextlib.contextmanager
def pipes_reporter(rank: int):
    """Rank 0's Dagster Pipes connection when the launcher's environment carries one, else None.
    ``dagster_pipes`` is imported only then: plain torchrun runs need no Dagster at all. An error
    inside closes the connection with the exception, which Dagster records."""
    if rank != 0 or "DAGSTER_PIPES_CONTEXT" not in os.environ:
        yield None
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        yield pipes


def _step_mark(use_cuda: bool):
    """Where an optimizer step ended: a CUDA event (the GPU's timeline) or the host clock."""
    if not use_cuda:
        return time.perf_counter()
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def _fault(rank: int, epoch: int, step: int) -> None:
    """Chaos hook for tests: FORGELINE_TRAIN_FAULT="rank:epoch:step:action" (kill | exit | abort | hang)."""
    spec = settings.train_fault()
    if not spec:
        return
    r, e, s, action = spec.split(":")
    if (int(r), int(e), int(s)) != (rank, epoch, step):
        return
    if action == "kill":
        os.killpg(os.getpgid(0), signal.SIGKILL)  # the whole run dies at once, like a node loss
    elif action == "exit":
        os._exit(17)
    elif action == "abort":  # SIGABRT, as a C++ exception nobody catches (gloo, a kernel) ends a rank
        os.abort()
    elif action == "hang":
        time.sleep(10**6)


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)(sys.argv[1])  # the failing rank's traceback reaches torchrun's root-cause report
