"""Multi-node training for real on one machine: two ``python -m pipeline.train node`` processes, each
its own torchrun launcher, meet over a c10d rendezvous on a loopback port and train the digits model
with one gloo rank each. Both ranks end with the same weights; a node killed mid-run, or one that
never starts, makes the other fail with a clear error within the configured timeouts."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline import datagen, dataset, train
from pipeline.train import checkpoints, worker
from pipeline.ingest import ingest_shards
from pipeline.models import build_model
from pipeline.storage import LocalStorage

SPEC = {"resize_shorter": 32, "crop": 28, "mean": [0.25], "std": [0.35]}
ROOT = Path(__file__).resolve().parent.parent
COLLECTIVE_S = 15  # a lost peer must fail the survivor well within this
JOIN_S = 6  # rendezvous join timeout for the "peer never starts" test
STARTUP_S = 20  # interpreter + torch import + torchrun start on 2 busy cores


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = LocalStorage(tmp_path_factory.mktemp("multinode") / "store", fsync=False)
    datagen.write_batch(store, "incoming/b1", datagen.load_digits(), samples_per_shard=256, image_size=32)
    ingest_shards(store, "b1")
    return store


def _job(store, name, *, epochs=1, join_s=60):
    cfg = train.TrainConfig(epochs=epochs, batch_size=64, num_threads=1, collective_timeout_s=COLLECTIVE_S,
                            rdzv_join_timeout_s=join_s)
    return train.prepare_node_job(storage=store, dataset=dataset.collect(store), spec=SPEC, config=cfg,
                                  checkpoint_prefix=f"ckpt/{name}", device_type="cpu", job_key=f"jobs/{name}.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One node process (its own session, like a pod), its merged output collected as it comes."""

    def __init__(self, store, job_key, rank, port, run_id, tmp_path, *, rank_from_env=False):
        args = [sys.executable, "-m", "pipeline.train", "node", "--storage", json.dumps(store.spec()[0]),
                "--job-key", job_key, "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", run_id, "--run-timeout-s", "120", "--cache-dir", str(tmp_path / f"cache{rank}")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if rank_from_env:  # how a Kubernetes indexed Job tells a pod its index
            env["JOB_COMPLETION_INDEX"] = str(rank)
        else:
            args += ["--node-rank", str(rank)]
        self.rank, self.lines = rank, []
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self._pump = threading.Thread(target=lambda: self.lines.extend(ln.rstrip("\n") for ln in self.proc.stdout),
                                      daemon=True)
        self._pump.start()

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._pump.join(5)
        return rc

    def saw(self, text: str) -> bool:
        return any(text in ln for ln in list(self.lines))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        """SIGKILL the node's process group; its torchrun and ranks follow (PR_SET_PDEATHSIG)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def nodes():
    started: list[Node] = []
    yield started
    for n in started:  # never leave a node behind, whatever the test did
        n.kill()
        n.proc.wait(10)


def _leftovers(run_id: str) -> list[str]:
    """Processes of this run still alive: torchrun carries the id on its command line, ranks in
    their environment (TORCHELASTIC_RUN_ID)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            try:
                if run_id.encode() in (d / "cmdline").read_bytes() + (d / "environ").read_bytes():
                    found.append(d.name)
            except OSError:
                continue
    return found


def _assert_no_leftovers(run_id: str) -> None:
    deadline = time.monotonic() + 10
    while _leftovers(run_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _leftovers(run_id), f"processes of {run_id} survived: {_leftovers(run_id)}"


def test_node_job_names_storage_keys_and_missing_result_is_clear(store):
    key = _job(store, "spec-only")
    job = json.loads(store.read(key))
    ds = dataset.collect(store)
    assert job["shards"]["train"] == [{"key": e["key"], "sha256": e["sha256"]} for e in ds["splits"]["train"]]
    assert job["dataset_version"] == ds["version"] and job["device_type"] == "cpu"
    with pytest.raises(train.TrainingFailed, match="no result for training job 'jobs/spec-only.json'"):
        train.read_node_result(store, key)


@pytest.mark.slow
def test_two_nodes_train_to_identical_weights(store, tmp_path, nodes):
    key, port, run_id = _job(store, "two-nodes"), _free_port(), f"mn-ok-{os.getpid()}"
    nodes += [Node(store, key, 0, port, run_id, tmp_path),
              Node(store, key, 1, port, run_id, tmp_path, rank_from_env=True)]
    rcs = [n.wait(180) for n in nodes]
    assert rcs == [0, 0], "\n\n".join(n.output[-3000:] for n in nodes)
    assert sum(n.saw("result written to") for n in nodes) == 1  # only the node hosting global rank 0

    res = train.read_node_result(store, key)
    assert res.world_size == 2 and res.device_type == "cpu" and [h["epoch"] for h in res.history] == [1]
    assert res.extra["val_samples"] == 269  # the two nodes together evaluated all of val once
    # Each rank hashed its own parameters; both equal the checkpoint rank 0 wrote, and training moved them.
    hashes = res.extra["rank_params_sha256"]
    names = [n for n, _ in build_model("digits_cnn").named_parameters()]
    ckpt = checkpoints.read_checkpoint(store, res.checkpoint, res.checkpoint_sha256)["model"]
    torch.manual_seed(0)
    init = build_model("digits_cnn").named_parameters()
    assert len(hashes) == 2 and hashes[0] == hashes[1] == worker.params_sha256((n, ckpt[n]) for n in names)
    assert hashes[0] != worker.params_sha256(init)
    _assert_no_leftovers(run_id)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])  # node 0 also hosts the rendezvous store
def test_node_killed_mid_run_fails_the_other_fast(store, tmp_path, nodes, victim):
    key, port, run_id = _job(store, f"kill{victim}", epochs=4), _free_port(), f"mn-kill{victim}-{os.getpid()}"
    nodes += [Node(store, key, r, port, run_id, tmp_path) for r in (0, 1)]
    deadline = time.monotonic() + 120
    while not any(n.saw("[forgeline] epoch 1/4") for n in nodes):  # training is under way on both
        assert time.monotonic() < deadline and all(n.proc.poll() is None for n in nodes), \
            "\n\n".join(n.output[-3000:] for n in nodes)
        time.sleep(0.1)
    dead, survivor = nodes[victim], nodes[1 - victim]
    dead.kill()
    t = time.monotonic()
    rc = survivor.wait(COLLECTIVE_S + 30)  # a hang would raise TimeoutExpired here
    elapsed = time.monotonic() - t
    assert rc == 1, survivor.output[-3000:]
    assert elapsed < COLLECTIVE_S, elapsed  # the lost peer is noticed, not waited out
    err = next(ln for ln in survivor.lines if "training failed" in ln)
    assert f"node {1 - victim} of 2" in err and "peer lost" in err, err
    assert not survivor.saw("[forgeline] epoch 4/4")
    with pytest.raises(train.TrainingFailed, match="no result"):
        train.read_node_result(store, key)
    _assert_no_leftovers(run_id)


@pytest.mark.slow
def test_peer_that_never_starts_times_out_the_rendezvous(store, tmp_path, nodes):
    """Node 0 alone waits for its peer at most the join timeout; node 1 alone (nobody hosts the
    store) gives up on reaching node 0 within about the same time. Both run side by side."""
    key = _job(store, "lonely", join_s=JOIN_S)
    t = time.monotonic()
    nodes += [Node(store, key, 0, _free_port(), f"mn-lone0-{os.getpid()}", tmp_path),
              Node(store, key, 1, _free_port(), f"mn-lone1-{os.getpid()}", tmp_path)]
    rcs = [n.wait(JOIN_S + STARTUP_S + 30) for n in nodes]
    elapsed = time.monotonic() - t
    assert rcs == [1, 1]
    assert elapsed < JOIN_S + STARTUP_S, elapsed
    err0 = next(ln for ln in nodes[0].lines if "training failed" in ln)
    err1 = next(ln for ln in nodes[1].lines if "training failed" in ln)
    assert "node 0 of 2" in err0
    assert f"rendezvous timed out: not all 2 nodes joined within rdzv_join_timeout_s={JOIN_S}" in err0
    assert "node 1 of 2" in err1 and "could not reach the rendezvous store" in err1
    assert not nodes[0].saw("epoch 1/")
