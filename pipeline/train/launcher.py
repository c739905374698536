"""The caller's half of training: run ``torchrun`` over the ranks as a child process group and
supervise it. :func:`launch` writes the job file, starts ``python -m torch.distributed.run ... -m
pipeline.train.worker JOB`` (standalone, or one node of a c10d rendezvous), keeps the tail of its
output, enforces the run timeout, and turns a failed or hung run into :class:`TrainingFailed` /
:class:`TrainingTimeout` naming the root cause. Per-epoch progress does not come through here: rank
0 reports it through Dagster Pipes when ``env`` carries a Pipes session's variables."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from pipeline import settings
from pipeline._libc import libc_function
from pipeline.storage import Storage, write_file_atomic
from pipeline.train.config import TrainConfig, TrainingFailed, TrainingTimeout


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


def die_with_parent() -> None:
    """If the parent dies (SIGKILL), take this process down too instead of orphaning it."""
    prctl = libc_function("prctl", [ctypes.c_int, ctypes.c_ulong])
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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
    ``env`` is added to the ranks' environment (device visibility, a Dagster Pipes session's
    bootstrap variables); ``synthetic`` (``{"samples": N, "shape": [C, H, W], "classes": K}``)
    replaces the data with random device tensors (benchmarks of the training step itself);
    ``rdzv`` (``{"nnodes": K, "node_rank": i, "endpoint": "host:port", "id": "run"}``) makes this one
    node of a multi-node run (c10d rendezvous; node 0 hosts the rendezvous store at ``endpoint``;
    joining waits at most ``config.rdzv_join_timeout_s``); default is a standalone single-node run.
    ``on_line`` receives every output line of torchrun and the ranks (a node echoes them to its log).
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
    write_file_atomic(job_path, json.dumps(job, indent=1), durable=False)

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
    cmd += ["-m", "pipeline.train.worker", str(job_path)]
    child_env = {**os.environ, **store_env, **(env or {}), "PYTHONUNBUFFERED": "1"}
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // world_size)))
    project_root = str(settings.PROJECT_ROOT)
    child_env["PYTHONPATH"] = project_root + os.pathsep + child_env.get("PYTHONPATH", "")

    try:
        tail: collections.deque[str] = collections.deque(maxlen=400)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env,
                                cwd=project_root, start_new_session=True, preexec_fn=die_with_parent)

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
            with _sigterm_raises():
                rc = _wait(proc, run_timeout_s)
        except _Orphaned as e:
            _kill_group(proc)
            reader.join(5)
            raise TrainingFailed(f"training stopped ({where}): {e}") from None
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            reader.join(5)
            said = "\n".join(list(tail)[-30:])
            raise TrainingTimeout(
                f"training did not finish within run_timeout_s={run_timeout_s:g} and was stopped ({where}); "
                + (f"last output:\n{said}" if said else "it wrote no output")
            ) from None
        except BaseException:
            _kill_group(proc)  # the caller was interrupted (Ctrl-C, SIGTERM, a canceled run): do not leave ranks running
            raise
        reader.join(10)
        proc.stdout.close()
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


class _Orphaned(Exception):
    """The process that started the launch is gone."""


def _wait(proc: subprocess.Popen, timeout_s: float, poll_s: float = 1.0) -> int:
    """``proc.wait(timeout_s)``, and :class:`_Orphaned` once this process's parent dies (a Dagster
    run worker SIGKILLed, e.g. by the OOM killer): the run is then failed and its pool slot freed,
    so training on past it would hold the GPUs outside the pool and publish into a failed run."""
    parent, deadline = os.getppid(), time.monotonic() + timeout_s
    while True:
        try:
            return proc.wait(timeout=max(0.0, min(poll_s, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:
                raise _Orphaned(f"the process that started it (pid {parent}) died") from None
            if time.monotonic() >= deadline:
                raise


@contextlib.contextmanager
def _sigterm_raises():
    """While waiting for torchrun in a main thread whose SIGTERM is still the default (which would
    end the process without cleanup, orphaning the ranks), SIGTERM raises KeyboardInterrupt so
    the process group is stopped first. A handler someone installed (Dagster's) is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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


# The last line of a Python traceback: an exception class, dotted or not, then its message
# ("pipeline.storage.base.CorruptObject: ...", "TrainingFailed: ..."), not only "...Error: ..."
_EXCEPTION_LINE = re.compile(r"\s*(?:\[[^\]]*\]:?\s*)?(?:[a-z_]\w*\.)*[A-Z][a-z]\w*: \S")


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
    errors = [ln.strip() for ln in lines if ("Error:" in ln or "error:" in ln or _EXCEPTION_LINE.match(ln))
              and "ChildFailedError" not in ln]
    if not failures:
        return "\n".join(lines[-30:])
    stopped = {r for r, v in failures.items() if "-15" in v.split()[:1]}
    order = sorted(failures, key=lambda r: (r in stopped, int(r)))
    parts = [f"rank {r}: exitcode {failures[r]}" + (" (stopped by torchrun after the failure)" if r in stopped else "")
             for r in order]
    return "; ".join(parts + errors[-3:] + _crash_sites(lines))


def _crash_sites(lines: list[str]) -> list[str]:
    """Where a rank killed by a signal (SIGABRT: an uncaught C++ exception in gloo or a kernel, an
    assert) was, since it leaves no Python error: the C++ runtime's ``what()`` and the innermost
    frames of faulthandler's dump of the crashing thread."""
    sites = [ln.strip() for ln in lines if "terminate called" in ln or "what():" in ln]
    for i, ln in enumerate(lines):
        if ln.startswith("Current thread") and ln.rstrip().endswith("(most recent call first):"):
            frames = [m.groups() for f in lines[i + 1 : i + 4]
                      if (m := re.match(r'\s*File "(?:.*/)?([^/"]+)", line (\d+) in (\S+)', f))]
            if frames:
                sites.append("crashed in " + " ← ".join(f"{func} ({name}:{no})" for name, no, func in frames))
    return sites[-3:]


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
