"""Mixed-precision DDP training, launched with torch's own launcher (torchrun).

Two halves:

* :func:`launch` (the caller's process, e.g. a Dagster step): writes a job file, starts
  ``python -m torch.distributed.run ... -m pipeline.train JOB`` as a child process group, streams its
  output, enforces a run timeout, and turns a failed/hung run into :class:`TrainingFailed` /
  :class:`TrainingTimeout` with the root cause. Multi-node runs pass rendezvous arguments instead of
  ``--standalone``; nothing else changes.
* :func:`worker` (each rank): DDP over NCCL (GPUs) or gloo (CPU ranks), DALI data feeding sharded by
  rank, ``torch.autocast`` (bf16 where supported, else fp16 + GradScaler), gradient accumulation,
  an atomic checkpoint every epoch written by rank 0 to the storage (model, optimizer, scaler,
  scheduler, epoch, RNG), and automatic resume from the latest checkpoint.

Determinism: every epoch reseeds torch from ``(seed, epoch, rank)`` and asks the loader for that
epoch's data, which is a pure function of ``(seed, epoch, rank)``. A run killed mid-epoch and
resumed from the epoch-``k`` checkpoint therefore replays epoch ``k+1`` exactly and ends with the
same weights and accuracy as a run that was never interrupted (on CPU; GPU kernels may differ in
the last bits).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

from pipeline._libc import libc_function
from pipeline.storage import ObjectNotFound, Storage, from_spec, join

CHECKPOINT_FORMAT = "forgeline.checkpoint/1"


class TrainingFailed(RuntimeError):
    """A rank failed (exception, OOM, killed) or a collective timed out; message has the cause."""


class TrainingTimeout(TrainingFailed):
    """The whole run exceeded its wall-clock budget and was stopped."""


@dataclass
class TrainConfig:
    """Hyperparameters and run controls (JSON-serializable: it travels in the job file)."""

    epochs: int = 15
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 64  # per rank, per micro-batch
    accumulation: int = 1  # micro-batches per optimizer step
    amp: str = "auto"  # auto | bf16 | fp16 | fp32
    seed: int = 0
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    model: str = "digits_cnn"
    model_kwargs: dict = field(default_factory=dict)
    num_threads: int = 0  # DALI + intra-op threads per rank; 0 = cores / ranks
    keep_checkpoints: int = 2
    collective_timeout_s: float = 120.0  # a dead peer fails the step after this long, not never
    rdzv_join_timeout_s: int = 600  # multi-node: a node that never joins fails the others after this long
    save_rank_weights: bool = False  # tests: each rank dumps its final parameters


def resolve_amp(amp: str, device_type: str):
    """``(autocast dtype or None, use GradScaler)`` for the requested mode on this device."""
    import torch

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


# ---------------------------------------------------------------------------------------------
# Checkpoints (rank 0 writes; every rank may read)
# ---------------------------------------------------------------------------------------------


def latest_checkpoint(store: Storage, prefix: str) -> dict | None:
    """The pointer written after the newest complete checkpoint, or None for a fresh run."""
    try:
        return json.loads(store.read(join(prefix, "latest.json")))
    except ObjectNotFound:
        return None


def read_checkpoint(store: Storage, key: str, expected_sha256: str | None = None) -> dict:
    """One checkpoint, verified against its recorded sha256, loaded on the CPU (weights only)."""
    import torch

    data = store.read(key)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise TrainingFailed(f"{store.uri(key)}: checkpoint sha256 does not match the recorded {expected_sha256}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_checkpoint(store: Storage, prefix: str) -> dict | None:
    """The newest complete checkpoint under ``prefix`` (via ``latest.json``), or None."""
    ptr = latest_checkpoint(store, prefix)
    return None if ptr is None else read_checkpoint(store, ptr["key"], ptr["sha256"])


def save_checkpoint(store: Storage, prefix: str, state: dict, keep: int) -> str:
    """Write ``epoch-NNNN.pt`` atomically, then move ``latest.json`` to it, then prune old ones.
    A crash at any point leaves ``latest.json`` naming a complete, verified checkpoint."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    key = join(prefix, f"epoch-{state['epoch']:04d}.pt")
    info = store.write_atomic(key, buf.getbuffer())
    ptr = {"format": CHECKPOINT_FORMAT, "epoch": state["epoch"], "key": key, "sha256": info.sha256, "bytes": info.size}
    store.write_atomic(join(prefix, "latest.json"), json.dumps(ptr).encode())
    ckpts = sorted(o.key for o in store.list(prefix) if o.key.rsplit("/", 1)[-1].startswith("epoch-"))
    for old in ckpts[:-keep] if keep > 0 else []:
        store.delete(old)
    return key


# ---------------------------------------------------------------------------------------------
# Worker (one per rank, started by torchrun)
# ---------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """If torchrun's agent dies (SIGKILL), take this rank down too instead of orphaning it."""
    prctl = libc_function("prctl", [ctypes.c_int, ctypes.c_ulong])
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _fault(rank: int, epoch: int, step: int) -> None:
    """Chaos hook for tests: FORGELINE_TRAIN_FAULT="rank:epoch:step:action" (kill | exit | hang)."""
    spec = os.environ.get("FORGELINE_TRAIN_FAULT")
    if not spec:
        return
    r, e, s, action = spec.split(":")
    if (int(r), int(e), int(s)) != (rank, epoch, step):
        return
    if action == "kill":
        os.killpg(os.getpgid(0), signal.SIGKILL)  # the whole run dies at once, like a node loss
    elif action == "exit":
        os._exit(17)
    elif action == "hang":
        time.sleep(10**6)


def worker(job_path: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pipeline.models import build_model
    from pipeline.preprocess import PreprocessSpec, WebDatasetLoader

    _die_with_parent()
    job = json.loads(Path(job_path).read_text())
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
    store = from_spec(job["storage"])
    prefix = job["checkpoint_prefix"]
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
    loss_fn = nn.CrossEntropyLoss()

    history: list[dict] = []
    start_epoch = 0
    ckpt = load_checkpoint(store, prefix)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        history = json.loads(ckpt["history"])
        start_epoch = int(ckpt["epoch"])
        if rank == 0:
            print(f"[forgeline] resuming from {prefix} epoch {start_epoch}", flush=True)

    def evaluate(loader) -> dict:
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for x, y in loader.epoch(0):
                out = model(x)
                totals += torch.stack([loss_fn(out.float(), y) * len(y), (out.argmax(1) == y).sum(), torch.tensor(len(y), device=device)]).double()
        dist.all_reduce(totals)
        model.train()
        return {"loss": float(totals[0] / totals[2]), "acc": float(totals[1] / totals[2]), "samples": int(totals[2])}

    from pipeline.metrics import summary as latency_summary

    def step_mark():  # where an optimizer step ended: a CUDA event (the GPU's timeline) or the host clock
        if not use_cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    step_seconds: list[float] = []  # every optimizer step this run took (not those of resumed epochs)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
        random.seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
        model.train()
        t0 = time.perf_counter()
        marks = [step_mark()]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for step, (x, y) in enumerate(train_loader.epoch(epoch)):
            if step >= steps_per_epoch:
                break
            _fault(rank, epoch, step)
            if use_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            last_micro = (step + 1) % cfg.accumulation == 0 or step + 1 == steps_per_epoch
            ctx = ddp.no_sync() if not last_micro else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = loss_fn(ddp(x).float(), y)
                scaler.scale(loss / cfg.accumulation).backward()
            if last_micro:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                if sched.last_epoch + 1 < opt_steps_total:
                    sched.step()
                marks.append(step_mark())
            loss_sum += loss.detach().double() * len(y)
            seen += len(y)
        counts = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
        dist.all_reduce(counts)
        if use_cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        # per optimizer step, data wait included (the first one also waits for the epoch's pipeline)
        epoch_steps = [a.elapsed_time(b) / 1e3 if use_cuda else b - a for a, b in zip(marks, marks[1:])]
        step_seconds += epoch_steps
        row = {"epoch": epoch + 1, "train_loss": float(counts[0] / counts[1]), "seconds": secs,
               "samples_per_s": float(counts[1]) / secs, "stall_seconds": train_loader.stats.get("stall_seconds", 0.0),
               **latency_summary(epoch_steps, "step_latency")}
        if "val" in evals:
            v = evaluate(evals["val"])
            row.update(val_loss=v["loss"], val_acc=v["acc"])
        history.append(row)
        if rank == 0:
            state = {
                "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "rng_torch": torch.get_rng_state(), "history": json.dumps(history), "config": json.dumps(asdict(cfg)),
            }
            save_checkpoint(store, prefix, state, cfg.keep_checkpoints)
            print(f"[forgeline] epoch {epoch + 1}/{cfg.epochs} " + " ".join(
                f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float)), flush=True)
        dist.barrier()  # nobody starts the next epoch before the checkpoint is published

    result = {"history": history, "world_size": world, "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
              "device_type": device.type, "resumed_from_epoch": start_epoch or None,
              **latency_summary(step_seconds, "step_latency")}
    for split, loader in evals.items():
        m = evaluate(loader)
        result[f"{split}_acc"], result[f"{split}_loss"], result[f"{split}_samples"] = m["acc"], m["loss"], m["samples"]
    # Each rank hashes its own parameters and rank 0 reports them all: proof that every rank (on
    # every node) ended with the same weights, without shipping weights between nodes.
    result["rank_params_sha256"] = [None] * world
    dist.all_gather_object(result["rank_params_sha256"], params_sha256(model.named_parameters()))
    if cfg.save_rank_weights:
        torch.save({k: v.detach().cpu() for k, v in model.named_parameters()}, Path(job["work_dir"]) / f"rank{rank}.pt")
    if rank == 0:
        ptr = latest_checkpoint(store, prefix)
        result["checkpoint"] = ptr["key"] if ptr else None
        result["checkpoint_sha256"] = ptr["sha256"] if ptr else None
        tmp = Path(job["result_path"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, job["result_path"])
    dist.destroy_process_group()


def params_sha256(named_tensors) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in order: equal hashes, equal weights."""
    import torch

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
        import torch

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


# ---------------------------------------------------------------------------------------------
# Launcher (the caller's process)
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    history: list[dict]
    world_size: int
    amp_dtype: str
    device_type: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    seconds: float
    resumed_from_epoch: int | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def best_val_acc(self) -> float | None:
        accs = [h["val_acc"] for h in self.history if "val_acc" in h]
        return max(accs) if accs else None


def launch(
    *,
    storage: Storage,
    shards: dict[str, list[str]],
    spec: dict,
    config: TrainConfig,
    checkpoint_prefix: str,
    world_size: int,
    device_type: str = "cpu",
    env: dict[str, str] | None = None,
    run_timeout_s: float = 3600.0,
    work_dir: str | os.PathLike | None = None,
    synthetic: dict | None = None,
    rdzv: dict | None = None,
    on_line: Callable[[str], None] | None = None,
) -> TrainResult | None:
    """Run training with torchrun and return rank 0's result.

    ``shards`` maps split → local shard paths; ``spec`` is a :class:`PreprocessSpec` as a dict;
    ``synthetic`` (``{"samples": N, "shape": [C, H, W], "classes": K}``) replaces the data with
    random device tensors (benchmarks of the training step itself);
    ``rdzv`` (``{"nnodes": K, "node_rank": i, "endpoint": "host:port", "id": "run"}``) makes this one
    node of a multi-node run (c10d rendezvous; node 0 hosts the rendezvous store at ``endpoint``;
    joining waits at most ``config.rdzv_join_timeout_s``); default is a standalone single-node run.
    Multi-node, only the node whose torchrun hosts global rank 0 gets the result; the others get
    None. Raises :class:`TrainingTimeout` / :class:`TrainingFailed` with the failing rank's error.
    """
    store_spec, store_env = storage.spec()
    own_tmp = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix="forgeline-train-"))
    work.mkdir(parents=True, exist_ok=True)
    result_path = work / "result.json"
    result_path.unlink(missing_ok=True)
    job = {"config": asdict(config), "storage": store_spec, "checkpoint_prefix": checkpoint_prefix,
           "shards": shards, "spec": spec, "device_type": device_type, "result_path": str(result_path),
           "work_dir": str(work), "synthetic": synthetic}
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job, indent=1))

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world_size}",
           "--max-restarts=0", "--monitor-interval=0.5"]
    if rdzv:
        node_rank, join_s = int(rdzv.get("node_rank", 0)), int(config.rdzv_join_timeout_s)
        # is_host explicit: the hostname heuristic can miss in a pod (then nobody hosts the store)
        # or match on several nodes of one host. read_timeout=join: a node whose store host never
        # comes up gives up when the join timeout would have, not after torch's default 60 s.
        # (no --node-rank: c10d ignores it and assigns ranks itself, so rank 0 may be on any node)
        cmd += [f"--nnodes={rdzv['nnodes']}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={rdzv['endpoint']}", f"--rdzv-id={rdzv.get('id', 'forgeline')}",
                f"--rdzv-conf=join_timeout={join_s},read_timeout={max(1, join_s // 2)},is_host={int(node_rank == 0)}"]
        where = f"node {node_rank} of {rdzv['nnodes']}, {world_size} rank(s) per node"
    else:
        cmd += ["--standalone", "--nnodes=1"]
        where = f"world size {world_size}"
    cmd += ["-m", "pipeline.train", str(job_path)]
    child_env = {**os.environ, **store_env, **(env or {}), "PYTHONUNBUFFERED": "1"}
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // world_size)))
    project_root = str(Path(__file__).resolve().parent.parent)
    child_env["PYTHONPATH"] = project_root + os.pathsep + child_env.get("PYTHONPATH", "")

    try:
        tail: collections.deque[str] = collections.deque(maxlen=400)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env,
                                cwd=project_root, start_new_session=True, preexec_fn=_die_with_parent)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if on_line:
                    on_line(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=run_timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            reader.join(5)
            raise TrainingTimeout(
                f"training did not finish within {run_timeout_s:.0f}s and was stopped "
                f"({where}); last output:\n" + "\n".join(list(tail)[-30:])
            ) from None
        except BaseException:
            _kill_group(proc)  # the caller was interrupted: do not leave ranks running
            raise
        reader.join(10)
        secs = time.perf_counter() - t0
        if rc == 0 and rdzv and not result_path.exists():
            return None  # a multi-node run that went well, but global rank 0 ran on another node
        if rc != 0 or not result_path.exists():
            cause = _rdzv_cause(list(tail), rdzv, config) if rdzv else None
            if cause is None:
                cause = _root_cause(list(tail))
                if re.search(r"timed out|timeout", cause, re.IGNORECASE):
                    cause = (f"a collective operation timed out after "
                             f"collective_timeout_s={config.collective_timeout_s:g}: a rank is hung or unreachable; {cause}")
            raise TrainingFailed(f"training failed (torchrun exit code {rc}, {where}): {cause}")
        res = json.loads(result_path.read_text())
    finally:
        if own_tmp:  # a work dir the caller did not ask for is ours to remove, success or not
            shutil.rmtree(work, ignore_errors=True)
    known = {f for f in TrainResult.__dataclass_fields__ if f not in ("seconds", "extra")}
    return TrainResult(seconds=secs, **{k: res.get(k) for k in known},
                       extra={k: v for k, v in res.items() if k not in known})


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _root_cause(lines: list[str]) -> str:
    """Every failed rank from torchrun's failure summary — real failures first, ranks torchrun
    merely stopped afterwards (SIGTERM) last — plus the ranks' own error lines. Falls back to the
    log tail when there is no summary (e.g. the launcher itself failed)."""
    failures: dict[str, str] = {}
    rank = None
    for ln in lines:
        key, _, val = (p.strip() for p in ln.partition(":"))
        if key == "rank":
            rank = val.split()[0]
        elif key == "exitcode" and rank is not None:
            failures[rank] = val
            rank = None
    errors = [ln.strip() for ln in lines if ("Error:" in ln or "error:" in ln) and "ChildFailedError" not in ln]
    if not failures:
        return "\n".join(lines[-30:])
    stopped = {r for r, v in failures.items() if "-15" in v.split()[:1]}
    order = sorted(failures, key=lambda r: (r in stopped, int(r)))
    parts = [f"rank {r}: exitcode {failures[r]}" + (" (stopped by torchrun after the failure)" if r in stopped else "")
             for r in order]
    return "; ".join(parts + errors[-3:])


def _rdzv_cause(lines: list[str], rdzv: dict, config: TrainConfig) -> str | None:
    """A multi-node failure in words when the rendezvous failed or a peer node was lost, followed
    by the launcher's own error lines (torchrun writes no failure summary for these); else None."""
    text = "\n".join(lines)
    endpoint, nnodes, join = rdzv["endpoint"], rdzv["nnodes"], config.rdzv_join_timeout_s
    if "RendezvousTimeoutError" in text:
        why = (f"rendezvous timed out: not all {nnodes} nodes joined within rdzv_join_timeout_s={join} "
               f"(a node never started, died before joining, or cannot reach {endpoint})")
    elif "RendezvousConnectionError" in text and "while trying to connect" in text:
        why = (f"rendezvous failed: could not reach the rendezvous store at {endpoint} within about "
               f"rdzv_join_timeout_s={join} (node 0, which hosts it, never started or is unreachable)")
    elif "RendezvousConnectionError" in text:
        why = (f"peer lost: the connection to the rendezvous store on node 0 ({endpoint}) broke "
               "(node 0 died or became unreachable)")
    elif m := re.search(r"(?:Connection (?:closed|reset) by peer|Read error|Write error)\s*(\[[^\]]+\](?::\d+)?)", text):
        # the local ranks' own failures follow, so a crash on this node is not hidden behind this
        return (f"peer lost: the rank at {m[1]} closed its connection (it died or its node was lost); "
                f"{_root_cause(lines)}")
    else:
        return None
    errors = list(dict.fromkeys(ln.strip() for ln in lines if re.search(r"\w(Error|Exception)\b", ln)
                                and not ln.lstrip().startswith(("File ", "raise "))))
    return "; ".join([why] + errors[-3:])


# ---------------------------------------------------------------------------------------------
# Multi-node: a job spec in storage, one `python -m pipeline.train node` per node (e.g. one pod of
# an indexed Kubernetes Job each), rank 0's result back in storage
# ---------------------------------------------------------------------------------------------

NODE_JOB_FORMAT = "forgeline.train-node-job/1"


def node_result_key(job_key: str) -> str:
    return f"{job_key}.result.json"


def prepare_node_job(*, storage: Storage, dataset: dict, spec: dict, config: TrainConfig, checkpoint_prefix: str,
                     device_type: str, job_key: str) -> str:
    """Write the job every node of a multi-node run reads, atomically, at ``job_key``; return it.

    Shards travel as storage keys with their sha256 (from :func:`pipeline.dataset.collect`), not
    local paths: each node stages and verifies them itself. A result left by an earlier run of the
    same key is removed, so :func:`read_node_result` never returns a stale one.
    """
    job = {
        "format": NODE_JOB_FORMAT, "config": asdict(config), "spec": spec, "checkpoint_prefix": checkpoint_prefix,
        "device_type": device_type, "dataset_version": dataset.get("version"),
        "shards": {split: [{k: e[k] for k in ("key", "sha256")} for e in entries]
                   for split, entries in dataset["splits"].items()},
    }
    storage.delete(node_result_key(job_key))
    storage.write_atomic(job_key, json.dumps(job, indent=1).encode())
    return job_key


def read_node_result(storage: Storage, job_key: str) -> TrainResult:
    """The result the node hosting global rank 0 wrote for ``job_key``."""
    key = node_result_key(job_key)
    try:
        res = json.loads(storage.read(key))
    except ObjectNotFound:
        raise TrainingFailed(f"{storage.uri(key)}: no result for training job {job_key!r}; the run has not "
                             "finished, or failed (see the node logs)") from None
    return TrainResult(**{k: res.get(k) for k in TrainResult.__dataclass_fields__ if k != "extra"},
                       extra=res.get("extra") or {})


def node_main(argv: list[str]) -> int:
    """``python -m pipeline.train node ...``: one node of a multi-node run (exit 0 on success)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.train node",
                                 description="Run one node of a multi-node training job (see docs/training.md).")
    ap.add_argument("--storage", required=True, help="JSON of Storage.spec()[0]; credentials come from the environment")
    ap.add_argument("--job-key", required=True, help="the key prepare_node_job wrote")
    ap.add_argument("--nnodes", type=int, required=True)
    ap.add_argument("--node-rank", type=int, help="default: $JOB_COMPLETION_INDEX (Kubernetes indexed Job)")
    ap.add_argument("--rdzv-endpoint", required=True, help="HOST:PORT of node 0 (it hosts the rendezvous store)")
    ap.add_argument("--rdzv-id", help="default: derived from --job-key (the same on every node)")
    ap.add_argument("--nproc-per-node", type=int, help="default: the visible GPUs for a cuda job, else 1 CPU rank")
    ap.add_argument("--run-timeout-s", type=float, default=3600.0)
    ap.add_argument("--cache-dir", help="where shards are staged; default $FORGELINE_HOME/cache/shards")
    args = ap.parse_args(argv)
    node_rank = args.node_rank
    if node_rank is None:
        if "JOB_COMPLETION_INDEX" not in os.environ:
            ap.error("--node-rank is required when JOB_COMPLETION_INDEX is not set")
        node_rank = int(os.environ["JOB_COMPLETION_INDEX"])
    if not 0 <= node_rank < args.nnodes:
        ap.error(f"node rank {node_rank} is not in [0, {args.nnodes})")
    tag = f"[forgeline] node {node_rank}/{args.nnodes}"

    store = from_spec(json.loads(args.storage))
    try:
        job = json.loads(store.read(args.job_key))
    except ObjectNotFound:
        raise SystemExit(f"{tag}: no training job at {store.uri(args.job_key)} (prepare_node_job writes it)") from None
    if job.get("format") != NODE_JOB_FORMAT:
        raise SystemExit(f"{tag}: {store.uri(args.job_key)} is not a {NODE_JOB_FORMAT} job")
    nproc = args.nproc_per_node
    if nproc is None:
        if job["device_type"] == "cuda":
            import torch

            nproc = torch.cuda.device_count()
            if nproc == 0:
                raise SystemExit(f"{tag}: the job wants cuda but this node sees no GPU")
        else:
            nproc = 1
    home = Path(os.environ.get("FORGELINE_HOME", Path(__file__).resolve().parent.parent / ".forgeline"))
    cache = Path(args.cache_dir) if args.cache_dir else home / "cache" / "shards"
    from pipeline.dataset import stage  # here: the worker entry must not pay for it

    shards = {split: stage(store, entries, cache) for split, entries in job["shards"].items()}
    rdzv = {"nnodes": args.nnodes, "node_rank": node_rank, "endpoint": args.rdzv_endpoint,
            "id": args.rdzv_id or "forgeline-" + hashlib.sha256(args.job_key.encode()).hexdigest()[:16]}
    print(f"{tag}: {nproc} rank(s), rendezvous {rdzv['id']} at {rdzv['endpoint']}", flush=True)
    try:
        res = launch(storage=store, shards=shards, spec=job["spec"], config=TrainConfig(**job["config"]),
                     checkpoint_prefix=job["checkpoint_prefix"], world_size=nproc, device_type=job["device_type"],
                     run_timeout_s=args.run_timeout_s, rdzv=rdzv, on_line=lambda ln: print(ln, flush=True))
    except TrainingFailed as e:
        print(f"{tag}: {e}", file=sys.stderr, flush=True)
        return 1
    if res is not None:  # this node hosted global rank 0
        store.write_atomic(node_result_key(args.job_key), json.dumps(asdict(res), indent=1).encode())
        print(f"{tag}: result written to {store.uri(node_result_key(args.job_key))}", flush=True)
    print(f"{tag}: done", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["node"]:  # torchrun always passes the worker an absolute job file path
        sys.exit(node_main(sys.argv[2:]))
    from torch.distributed.elastic.multiprocessing.errors import record

    record(worker)(sys.argv[1])  # the failing rank's traceback reaches torchrun's root-cause report
