"""Training for real on CPU: two gloo ranks via torchrun on the digits shards. DDP keeps ranks'
weights identical; a run killed mid-epoch resumes from its checkpoint to the same weights; a dead
or hung rank fails the run with a clear error within the configured timeouts."""

import io
import json
import re
import time

import pytest
import torch

from pipeline import datagen, dataset, train
from pipeline.train import checkpoints, launcher, worker
from pipeline.ingest import ingest_shards
from pipeline.models import build_model
from pipeline.preprocess import PreprocessSpec
from pipeline.storage import LocalStorage

SPEC = {"resize_shorter": 32, "crop": 28, "mean": [0.25], "std": [0.35]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    store = LocalStorage(root / "store", fsync=False)
    datagen.write_batch(store, "incoming/b1", datagen.load_digits(), samples_per_shard=256, image_size=32)
    ingest_shards(store, "b1")
    return store, dataset.stage_all(store, dataset.collect(store), root / "cache")


def _launch(data, tmp_path, prefix, *, env=None, run_timeout_s=300, **cfg):
    store, shards = data
    config = train.TrainConfig(**{"epochs": 1, "batch_size": 64, "num_threads": 1, **cfg})
    return train.launch(storage=store, shards=shards, spec=SPEC, config=config, checkpoint_prefix=prefix,
                        world_size=2, env=env, work_dir=tmp_path / prefix.replace("/", "_"),
                        run_timeout_s=run_timeout_s)


def _weights(store, key):
    return torch.load(io.BytesIO(store.read(key)), weights_only=True)["model"]


def test_spec_keys_match_preprocess():
    assert set(SPEC) <= set(PreprocessSpec.__dataclass_fields__)


def test_two_gloo_ranks_hold_identical_weights(data, tmp_path):
    res = _launch(data, tmp_path, "ckpt/ddp", save_rank_weights=True)
    work = tmp_path / "ckpt_ddp"
    r0, r1 = torch.load(work / "rank0.pt"), torch.load(work / "rank1.pt")
    torch.manual_seed(0)
    init = dict(build_model("digits_cnn").named_parameters())
    assert r0.keys() == r1.keys() == init.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # allreduce kept the ranks in lockstep
    assert any(not torch.equal(r0[k], init[k].detach()) for k in r0)  # and training moved them
    assert res.world_size == 2 and res.device_type == "cpu"
    # each rank saw its own half of the data; together all of val was evaluated exactly once
    assert res.extra["val_samples"] == 269 and res.extra["test_samples"] == 269
    # rank 0 timed every optimizer step: (1259 // 2) // 64 = 9 in the one epoch
    assert res.extra["step_latency_count"] == res.history[0]["step_latency_count"] == 9
    assert 0 < res.extra["step_latency_p50_ms"] <= res.extra["step_latency_p99_ms"] <= res.extra["step_latency_max_ms"]


_ORPHAN_STEP = """
import json, sys
from pathlib import Path
from pipeline import train
from pipeline.storage import LocalStorage

args = json.loads(sys.argv[1])
flag, out = Path(args["flag"]), Path(args["out"])
config = train.TrainConfig(epochs=200, batch_size=64, num_threads=1)
try:
    train.launch(storage=LocalStorage(args["root"], fsync=False), shards=args["shards"], spec=args["spec"],
                 config=config, checkpoint_prefix="ckpt/orphan", world_size=2, work_dir=args["work"],
                 run_timeout_s=300, on_line=lambda line: "[forgeline] epoch" in line and flag.touch())
    out.write_text("finished")
except train.TrainingFailed as e:
    out.write_text(str(e))
"""


def test_a_launch_whose_parent_dies_stops_its_ranks(data, tmp_path):
    """The process that runs the training step (a Dagster step process) outlives its run worker
    when that is SIGKILLed (the OOM killer): Dagster fails the run and frees its GPU pool slot. The
    launch then stops torchrun and the ranks, not train on outside the pool and publish into a
    failed run."""
    import json
    import os
    import subprocess
    import sys

    import psutil

    store, shards = data
    flag, out, work = tmp_path / "training", tmp_path / "out.txt", tmp_path / "work"
    args = json.dumps({"root": str(store.root), "shards": shards, "spec": SPEC, "flag": str(flag), "out": str(out),
                       "work": str(work)})
    worker = (f"import subprocess, sys, time, os\n"
              f"subprocess.Popen([sys.executable, '-c', {_ORPHAN_STEP!r}, {args!r}])\n"
              f"while not os.path.exists({str(flag)!r}): time.sleep(0.05)\n"
              f"os._exit(0)  # SIGKILLed, as far as its children can tell\n")
    repo = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
    subprocess.run([sys.executable, "-c", worker], cwd=repo, env={**os.environ, "PYTHONPATH": repo}, timeout=120,
                   check=True)
    deadline = time.monotonic() + 60
    while not out.exists():
        assert time.monotonic() < deadline, "the orphaned launch did not stop"
        time.sleep(0.1)
    said = out.read_text()
    assert said.startswith("training stopped (") and "the process that started it (pid " in said and "died" in said
    time.sleep(1)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(work) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]  # no torchrun, no rank


def test_a_diverged_run_stops_at_its_first_nan_epoch_naming_it(data, tmp_path):
    """A learning rate far too high: the loss goes NaN, the run stops at that epoch, saying so (no
    NaN checkpoint), instead of training on and publishing a model of NaN weights."""
    with pytest.raises(train.TrainingFailed, match=r"train_loss is nan in epoch \d+: the training diverged "
                                                   r"\(lr=1e\+06, amp auto\); lower lr or use amp fp32"):
        _launch(data, tmp_path, "ckpt/diverged", epochs=20, lr=1e6)
    store, _ = data
    ptr = checkpoints.latest_checkpoint(store, "ckpt/diverged")
    for h in json.loads(checkpoints.load_checkpoint(store, "ckpt/diverged")["history"]) if ptr else []:
        assert h["train_loss"] == h["train_loss"]  # every checkpointed epoch had a finite loss


def test_a_step_larger_than_a_ranks_data_is_refused_before_any_rank_starts():
    """batch_size x accumulation over a rank's samples: no optimizer step would ever be taken (each
    rank drops its last, incomplete batch); the run once ended 'successfully' at 10% accuracy."""
    train.TrainConfig(batch_size=64, accumulation=4).check_before_launch(1259, 2, "cpu")  # 256 of 629: fine
    for cfg in (train.TrainConfig(batch_size=100_000), train.TrainConfig(batch_size=64, accumulation=10)):
        with pytest.raises(train.TrainingFailed, match=r"samples per optimizer step, but each of the 2 ranks gets "
                                                       r"629 training samples \(1259 in all\): no step would be taken"):
            cfg.check_before_launch(1259, 2, "cpu")
    with pytest.raises(train.TrainingFailed, match="amp fp16 needs a CUDA device .*on cpu"):  # not at every rank
        train.TrainConfig(amp="fp16").check_before_launch(1259, 2, "cpu")
    train.TrainConfig(amp="fp16").check_before_launch(1259, 2, "cuda")


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path):
    """The newest checkpoint truncated (or its pointer damaged): the run resumes from the older
    intact one and says so; with nothing intact, one line names the file and the way out. Both once
    ended as 'rank 0: exitcode 1', the ranks' own error lines being dropped."""
    store = LocalStorage(tmp_path / "store")
    for epoch in (1, 2):
        checkpoints.save_checkpoint(store, "ckpt/r", {"epoch": epoch, "w": torch.full((4,), float(epoch))}, keep=2)
    said = []
    store.write_atomic("ckpt/r/epoch-0002.pt", store.read("ckpt/r/epoch-0002.pt")[:100])
    state = checkpoints.load_checkpoint(store, "ckpt/r", warn=said.append)
    assert state["epoch"] == 1 and len(said) == 1
    assert said[0].startswith(f"[forgeline] {store.uri('ckpt/r/epoch-0002.pt')}: checkpoint sha256 does not match")
    assert said[0].endswith(f"resuming from the older {store.uri('ckpt/r/epoch-0001.pt')} instead "
                            "(latest.json now names it)")
    assert checkpoints.latest_checkpoint(store, "ckpt/r")["key"] == "ckpt/r/epoch-0001.pt"
    assert checkpoints.load_checkpoint(store, "ckpt/r", warn=said.append)["epoch"] == 1 and len(said) == 1
    store.write_atomic("ckpt/r/epoch-0001.pt", b"not a checkpoint")
    with pytest.raises(train.TrainingFailed, match=r"epoch-0001\.pt: checkpoint sha256 does not match .*no older "
                                                   r"intact checkpoint under .*ckpt/r: start over with fresh: true"):
        checkpoints.load_checkpoint(store, "ckpt/r", warn=said.append)
    # a rank's own exception line (not only "...Error:") reaches the launch's one line
    lines = ["[rank0]: Traceback (most recent call last):", "[rank0]: pipeline.train.config.TrainingFailed: "
             "s3://b/ckpt/r/epoch-0002.pt: checkpoint sha256 does not match", "rank      : 0", "exitcode  : 1 (pid: 7)"]
    assert "TrainingFailed: s3://b/ckpt/r/epoch-0002.pt: checkpoint sha256" in launcher._root_cause(lines)


def test_a_damaged_checkpoint_pointer_is_one_line_naming_it(tmp_path):
    """``latest.json`` truncated outside forgeline: resuming says which file and what is wrong (and,
    with an intact checkpoint beside it, resumes from that: see the test above)."""
    from pipeline.storage import CorruptObject, LocalStorage

    store = LocalStorage(tmp_path / "store")
    assert checkpoints.latest_checkpoint(store, "ckpt/x") is None  # a fresh run
    store.write_atomic("ckpt/x/latest.json", b'{"epoch": 1, "key": "ckpt/x/epo')
    with pytest.raises(CorruptObject, match=re.escape(store.uri("ckpt/x/latest.json")) + r": not valid JSON .*"
                                             r"the checkpoint pointer is corrupt or truncated"):
        checkpoints.latest_checkpoint(store, "ckpt/x")
    with pytest.raises(train.TrainingFailed, match=re.escape(store.uri("ckpt/x/latest.json")) + r": not valid JSON "
                       r".*the checkpoint pointer is corrupt or truncated; no older intact checkpoint"):
        checkpoints.load_checkpoint(store, "ckpt/x")
    checkpoints.save_checkpoint(store, "ckpt/y", {"epoch": 1, "w": torch.ones(2)}, keep=2)
    store.write_atomic("ckpt/y/latest.json", b'{"epoch": 1, "key": "ckpt/y/epo')  # the pointer alone damaged
    assert checkpoints.load_checkpoint(store, "ckpt/y", warn=lambda line: None)["epoch"] == 1


def test_killed_run_resumes_to_the_same_weights(data, tmp_path):
    store, _ = data
    ref = _launch(data, tmp_path, "ckpt/ref", epochs=3)
    with pytest.raises(train.TrainingFailed):
        _launch(data, tmp_path, "ckpt/killed", epochs=3, env={"FORGELINE_TRAIN_FAULT": "0:1:3:kill"})
    assert checkpoints.latest_checkpoint(store, "ckpt/killed")["epoch"] == 1  # epoch 2 never completed
    resumed = _launch(data, tmp_path, "ckpt/killed", epochs=3)
    assert resumed.resumed_from_epoch == 1
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a, b = _weights(store, ref.checkpoint), _weights(store, resumed.checkpoint)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.test_acc == ref.test_acc


@pytest.mark.parametrize("fault,expect", [
    ("1:0:2:exit", "rank 1: exitcode 17"),  # a rank dies
    ("1:0:2:abort", "crashed in _fault (worker.py:"),  # a rank aborts (SIGABRT): where it was
    ("1:0:2:hang", "collective operation timed out after collective_timeout_s=5"),  # a rank hangs
])
def test_dead_or_hung_rank_fails_fast(data, tmp_path, fault, expect):
    t = time.monotonic()
    with pytest.raises(train.TrainingFailed) as err:
        _launch(data, tmp_path, f"ckpt/{fault.replace(':', '')}", env={"FORGELINE_TRAIN_FAULT": fault},
                collective_timeout_s=5)
    assert time.monotonic() - t < 90
    assert "training failed" in str(err.value) and expect in str(err.value)


def test_a_native_crash_is_named_by_its_exception_and_frames():
    """What an uncaught C++ exception (gloo's, say) leaves in a rank's output: the runtime's
    ``what()`` and faulthandler's dump of the crashing thread, other threads' dumps ignored."""
    lines = ["terminate called after throwing an instance of 'gloo::EnforceNotMet'",
             "  what():  [enforce fail at pair.cc:446] op.preamble.length <= op.nbytes. 8 vs 4",
             "Fatal Python error: Aborted", "",
             "Thread 0x00007f00000000aa (most recent call first):",
             '  File "/usr/lib/python3.11/threading.py", line 320 in wait', "",
             "Current thread 0x00007f00000000bb (most recent call first):",
             '  File "/v/torch/distributed/distributed_c10d.py", line 2101 in destroy_process_group',
             '  File "/w/pipeline/train/worker.py", line 120 in main', "", "Extension modules: torch._C"]
    assert launcher._crash_sites(lines) == [
        "terminate called after throwing an instance of 'gloo::EnforceNotMet'",
        "what():  [enforce fail at pair.cc:446] op.preamble.length <= op.nbytes. 8 vs 4",
        "crashed in destroy_process_group (distributed_c10d.py:2101) ← main (worker.py:120)"]
    assert launcher._crash_sites(["rank 1 exited with code 17"]) == []


def test_run_timeout_stops_a_stuck_run(data, tmp_path):
    t = time.monotonic()
    with pytest.raises(train.TrainingTimeout, match="did not finish within run_timeout_s=20 "):
        _launch(data, tmp_path, "ckpt/timeout", env={"FORGELINE_TRAIN_FAULT": "0:0:1:hang"},
                collective_timeout_s=600, run_timeout_s=20)
    assert time.monotonic() - t < 60


def test_amp_modes():
    assert worker.resolve_amp("auto", "cpu") == (torch.bfloat16, False)
    assert worker.resolve_amp("fp32", "cpu") == (None, False)
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA device"):
        worker.resolve_amp("fp16", "cpu")
    with pytest.raises(ValueError, match="amp must be"):
        worker.resolve_amp("int8", "cpu")


def test_bf16_autocast_run_on_cpu(data, tmp_path):
    res = _launch(data, tmp_path, "ckpt/bf16", amp="bf16", epochs=4)
    assert res.amp_dtype == "bfloat16"
    losses = [h["train_loss"] for h in res.history]
    assert all(loss == loss for loss in losses)  # no NaN
    assert losses[-1] < 0.7 * losses[0] and res.val_acc > 0.5  # bf16 training learns the digits


@pytest.mark.gpu
def test_nccl_training_on_gpu(data, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    store, shards = data
    n = torch.cuda.device_count()
    res = train.launch(storage=store, shards=shards, spec=SPEC, config=train.TrainConfig(epochs=2),
                       checkpoint_prefix="ckpt/gpu", world_size=n, device_type="cuda", work_dir=tmp_path / "gpu")
    assert res.device_type == "cuda" and res.world_size == n and res.amp_dtype == "bfloat16"


def test_synthetic_mode_trains_resnet_shapes_without_data(tmp_path):
    """The benchmark path: random device tensors instead of shards, SGD, a registered model."""
    store = LocalStorage(tmp_path / "s", fsync=False)
    cfg = train.TrainConfig(epochs=1, batch_size=4, optimizer="sgd", lr=0.01, num_threads=1,
                            model="digits_cnn", model_kwargs={"in_channels": 3, "num_classes": 5})
    res = train.launch(storage=store, shards={}, spec={}, config=cfg, checkpoint_prefix="syn", world_size=2,
                       work_dir=tmp_path / "w", synthetic={"samples": 32, "shape": [3, 28, 28], "classes": 5})
    assert res.history[0]["samples_per_s"] > 0 and res.val_acc is None
    assert checkpoints.latest_checkpoint(store, "syn")["epoch"] == 1


def test_trained_model_reports_each_epoch_through_pipes(data, tmp_path, monkeypatch):
    """The asset runs torchrun inside a Dagster Pipes session: rank 0 logs every epoch's metrics
    through Pipes, and each line reaches the event log when its epoch ends, not with the result."""
    import dagster as dg

    from assets.train import trained_model
    from resources.gpu import GpuPoolResource
    from resources.storage import LocalStorageResource

    store, _ = data
    monkeypatch.setenv("FORGELINE_HOME", str(tmp_path / "home"))

    @dg.asset(name="preprocessed")
    def stub() -> dict:
        return {"dataset": dataset.collect(store), "spec": SPEC}

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [stub, trained_model], instance=instance,
            resources={"storage": LocalStorageResource(root=str(store.root)),
                       "gpu_pool": GpuPoolResource(lock_dir=str(tmp_path / "locks"))},
            run_config={"ops": {"trained_model": {"config": {"epochs": 2, "fresh": True, "min_accuracy": 0.0}}}},
        )
        assert result.success
        logs = [e for e in instance.all_logs(result.run_id) if e.user_message and e.step_key == "trained_model"]
    epochs = {n: next(e for e in logs if e.user_message.startswith(f"epoch {n}/2:")) for n in (1, 2)}
    for e in epochs.values():
        for key in ("train_loss=", "val_acc=", "samples_per_s=", "seconds="):
            assert key in e.user_message, e.user_message
    assert any("[pipes] external process successfully opened dagster pipes" in e.user_message for e in logs)
    assert not any("did not receive" in e.user_message for e in logs)  # rank 0 closed the session cleanly
    assert result.asset_materializations_for_node("trained_model")[0].metadata["epoch_latency_count"].value == 2
    epoch2_seconds = float(epochs[2].user_message.split("seconds=")[1].split()[0].rstrip(","))
    # live: epoch 1's line was in the event log while epoch 2 was still training
    assert epochs[2].timestamp - epochs[1].timestamp >= 0.5 * epoch2_seconds
