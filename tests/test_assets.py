"""Ingestion through Dagster: ``materialize()`` of the partitioned assets, their checks and metadata,
the landing sensor, and the job launched through the ``forgeline`` CLI on a real instance."""

import json

import dagster as dg
import pytest

from assets.ingest import raw_shards, raw_table
from assets.partitions import batches
from jobs.ingest import incoming_batches
from pipeline import datagen
from resources.storage import LocalStorageResource


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def storage(tmp_path):
    return LocalStorageResource(root=str(tmp_path / "store"))


def _land(storage, batch, data=None, **kw):
    return datagen.write_batch(storage.client(), f"incoming/{batch}", data or datagen.load_digits(), **kw)


def _materialize(instance, storage, batch, **kw):
    instance.add_dynamic_partitions(batches.name, [batch])
    return dg.materialize([raw_shards, raw_table], partition_key=batch, instance=instance,
                          resources={"storage": storage}, **kw)


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _assert_timed(md, latency: str, *throughput: str) -> None:
    """The observability keys every stage records: wall seconds, throughput, P50/P95/P99 as
    positive floats (so the UI plots them)."""
    for key in ("seconds", *throughput, *(f"{latency}_p{q}_ms" for q in (50, 95, 99))):
        assert isinstance(md[key].value, float) and md[key].value > 0, key
    assert md[f"{latency}_p50_ms"].value <= md[f"{latency}_p95_ms"].value <= md[f"{latency}_p99_ms"].value
    assert md[f"{latency}_count"].value > 0


def test_materialize_good_batch(instance, storage):
    _land(storage, "b1", image_size=16)
    result = _materialize(instance, storage, "b1")
    assert result.success
    md = result.asset_materializations_for_node("raw_shards")[0].metadata
    assert md["samples"].value == 1797 and md["shards_quarantined"].value == 0
    assert md["mb_per_s"].value > 0
    assert json.loads(open(md["manifest"].value).read())["samples"] == 1797
    tmd = result.asset_materializations_for_node("raw_table")[0].metadata
    assert tmd["rows"].value == 1797
    assert tmd["splits"].value == {"test": 269, "train": 1259, "val": 269}
    _assert_timed(md, "shard_latency", "mb_per_s", "samples_per_s")
    _assert_timed(tmd, "file_latency", "mb_per_s", "rows_per_s")
    assert md["shard_latency_count"].value == md["shards_published"].value
    assert _checks(result) == {"no_quarantined_shards": True, "all_classes_present": True, "every_split_present": True}
    # recorded on the instance, per partition
    assert instance.get_materialized_partitions(dg.AssetKey("raw_shards")) == {"b1"}


def test_bad_shard_warns_but_publishes_good_ones(instance, storage):
    _land(storage, "b2")
    storage.client().write_atomic("incoming/b2/shards/zz-broken.tar", b"not a tar" * 100)
    result = _materialize(instance, storage, "b2")
    assert result.success
    md = result.asset_materializations_for_node("raw_shards")[0].metadata
    assert md["shards_quarantined"].value == 1
    assert md["quarantined"].value[0]["source"] == "incoming/b2/shards/zz-broken.tar"
    assert md["samples"].value == 1797
    evals = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not evals["no_quarantined_shards"].passed
    assert evals["no_quarantined_shards"].severity == dg.AssetCheckSeverity.WARN


def test_bad_table_fails_the_step_with_file_and_column(instance, storage):
    import polars as pl

    _land(storage, "b3")
    store = storage.client()
    path = store.local_path("incoming/b3/table.parquet")
    pl.read_parquet(path).drop("px_07").write_parquet(path)
    result = _materialize(instance, storage, "b3", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.cause.message if failure.event_specific_data.error.cause else ""
    message += failure.event_specific_data.error.message
    assert "incoming/b3/table.parquet" in message and "column 'px_07' is missing" in message
    assert store.list("raw/table/b3") == []


def test_sensor_adds_partitions_once_per_ready_batch(instance, storage):
    store = storage.client()
    _land(storage, "day1", samples_per_shard=1000)
    datagen.write_shards(store, "incoming/day2/shards", datagen.load_digits())  # still landing: no _READY

    ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage})
    result = incoming_batches(ctx)
    assert [r.partition_key for r in result.run_requests] == ["day1"]
    assert [r.run_key for r in result.run_requests] == ["ingest:day1"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["day1"]

    # same objects again → no new run; day2 finishes landing → exactly one new run
    ctx2 = dg.build_sensor_context(instance=instance, resources={"storage": storage}, cursor=result.cursor)
    assert isinstance(incoming_batches(ctx2), dg.SkipReason)
    store.write_atomic("incoming/bad name/_READY", b"{}")  # never a partition: the tick's line says why
    skip = incoming_batches(dg.build_sensor_context(instance=instance, resources={"storage": storage},
                                                    cursor=result.cursor))
    assert "(1 ready, all requested or ingested); refused incoming/bad name/: " in skip.skip_message, skip.skip_message
    store.delete("incoming/bad name/_READY")
    store.write_atomic("incoming/day2/_READY", b"{}")
    result3 = incoming_batches(dg.build_sensor_context(instance=instance, resources={"storage": storage},
                                                       cursor=result.cursor))
    assert [r.partition_key for r in result3.run_requests] == ["day2"]
    assert json.loads(result3.cursor) == ["day1", "day2"]


def test_cli_launch_runs_the_job_on_the_instance(tmp_path, monkeypatch, capsys):
    from jobs import cli

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(tmp_path / "store"))
    assert cli.main(["gen", "digits", "--batch", "cli-1", "--samples-per-shard", "900"]) == 0
    assert cli.main(["launch", "ingest", "--partition", "cli-1"]) == 0
    inst = dg.DagsterInstance.get()
    assert inst.get_dynamic_partitions("batches") == ["cli-1"]
    assert inst.get_materialized_partitions(dg.AssetKey("raw_table")) == {"cli-1"}
    assert cli.main(["launch", "ingest"]) == 1  # a user error: one line, non-zero
    assert "is partitioned: pass --partition" in capsys.readouterr().err


def test_cli_report_prints_the_latest_numbers(tmp_path, monkeypatch, capsys):
    import re

    from rich.console import Console

    from jobs import cli

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(tmp_path / "store"))
    monkeypatch.setattr(cli, "console", Console(width=300, record=True))  # wide: no folded numbers
    assert cli.main(["report"]) == 0
    assert "no asset has been materialized" in cli.console.export_text()
    capsys.readouterr()
    assert cli.main(["report", "--json"]) == 0 and json.loads(capsys.readouterr().out)["assets"] == {}

    assert cli.main(["gen", "digits", "--batch", "rep-1", "--samples-per-shard", "900"]) == 0
    assert cli.main(["launch", "ingest", "--partition", "rep-1"]) == 0
    cli.console.export_text()  # drop what gen/launch printed
    capsys.readouterr()

    assert cli.main(["report"]) == 0
    text = cli.console.export_text()
    capsys.readouterr()
    for row in ("raw_shards", "raw_table"):
        assert re.search(rf"│ {row}\s+│ \d{{4}}-\d\d-\d\dT[\d:]+\+00:00\s+│ rep-1\s+│ [0-9a-f]{{8}}\s+│ seconds=[\d.]+", text)
    for key in ("shard_latency_p50_ms", "shard_latency_p99_ms", "file_latency_p95_ms", "mb_per_s", "rows_per_s"):
        assert re.search(rf"{key}=\d[\d.e+]*", text), key
    assert "no_quarantined_shards: pass" in text and "every_split_present: pass" in text

    assert cli.main(["report", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    shards = out["assets"]["raw_shards"]
    assert shards["partition"] == "rep-1" and len(shards["run_id"]) == 36
    metrics = shards["metrics"]
    assert list(metrics)[0] == "seconds" and metrics["seconds"] > 0 and metrics["samples"] == 1797
    assert 0 < metrics["shard_latency_p50_ms"] <= metrics["shard_latency_p95_ms"] <= metrics["shard_latency_p99_ms"]
    assert metrics["shard_latency_count"] == metrics["shards_published"] > 0  # one per shard
    assert {"name": "all_classes_present", "passed": True, "severity": "ERROR"}.items() <= next(
        c for c in shards["checks"] if c["name"] == "all_classes_present").items()
    assert out["assets"]["raw_table"]["metrics"]["file_latency_p50_ms"] > 0

    assert cli.main(["report", "--json", "--asset", "raw_table"]) == 0
    assert list(json.loads(capsys.readouterr().out)["assets"]) == ["raw_table"]
    assert cli.main(["report", "--asset", "trained_model"]) == 1  # not materialized here
    assert "asset 'trained_model' has not been materialized" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["report", "--asset", "trained-model"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("forgeline: unknown asset 'trained-model'; assets: raw_shards, ") and "\n" not in err, err


def test_ingest_on_s3_through_env_configured_resource(instance, s3_storage, s3_server, s3_credentials, monkeypatch):
    """The same assets on S3: the resource is chosen and configured from the environment
    (credentials as EnvVars), against the real local S3 server."""
    from resources.storage import S3StorageResource, storage_from_env

    monkeypatch.setenv("FORGELINE_S3_BUCKET", s3_storage.bucket)
    monkeypatch.setenv("FORGELINE_S3_PREFIX", "lake")
    monkeypatch.setenv("FORGELINE_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_credentials["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_credentials["aws_secret_access_key"])
    monkeypatch.setenv("FORGELINE_S3_CONCURRENCY", "5")
    resource = storage_from_env()
    assert isinstance(resource, S3StorageResource)

    from pipeline.storage import configured
    from resources.storage import open_storage

    store = open_storage(resource)
    assert store.concurrency == 5 and configured().concurrency == 5  # the run's store and the CLI's / server's
    datagen.write_batch(store, "incoming/s3-1", datagen.load_digits(), samples_per_shard=700)
    store.write_atomic("incoming/s3-1/shards/zz-cut.tar", store.read("incoming/s3-1/shards/val-000000.tar")[:5000])

    result = _materialize(instance, resource, "s3-1")

    assert result.success
    md = result.asset_materializations_for_node("raw_shards")[0].metadata
    assert md["samples"].value == 1797 and md["shards_quarantined"].value == 1
    assert md["manifest"].value == f"s3://{s3_storage.bucket}/lake/raw/shards/s3-1/manifest.json"
    manifest = json.loads(store.read("raw/shards/s3-1/manifest.json"))
    for entry in manifest["shards"]:
        assert store.checksum(entry["key"]) == entry["sha256"]
    assert store.exists("quarantine/shards/s3-1/zz-cut.tar.reason.json")
    [warned] = [e for e in result.get_asset_check_evaluations() if e.check_name == "no_quarantined_shards"]
    assert not warned.passed and warned.description.startswith(  # the CLI and the UI show which and why
        f"1 quarantined in s3://{s3_storage.bucket}/lake/quarantine/shards/s3-1: zz-cut.tar: "), warned.description
    assert result.asset_materializations_for_node("raw_table")[0].metadata["rows"].value == 1797


def test_a_checkpoint_is_resumed_only_under_the_preprocessing_it_was_trained_with():
    """The checkpoint prefix (what a re-run resumes from) names the preprocessing too: a finished
    crop-28 run was once resumed, with zero epochs to train, for a crop-20 run."""
    from assets.train import TrainingConfig, _run_name

    spec = {"resize_shorter": 32, "crop": 28, "mean": [0.25], "std": [0.35]}
    name = _run_name(TrainingConfig(), "data-v1", "run-1", spec)
    assert name == _run_name(TrainingConfig(), "data-v1", "run-2", dict(spec))  # an identical re-run resumes
    for change in ({"crop": 20}, {"resize_shorter": 20}, {"mean": [0.5]}, {"mean": [0.25, 0.25, 0.25]}):
        assert _run_name(TrainingConfig(), "data-v1", "run-1", {**spec, **change}) != name, change


def test_lifecycle_trains_packages_and_gates(tmp_path, monkeypatch):
    """The whole `lifecycle` job on the digits data, CPU ranks: the default conv net passes the
    ≥97% held-out check, exports bit-exact, passes the quantization gate and caches its compile
    artifacts; a second run resumes from the final checkpoint and hits the compile cache; a gate
    that cannot pass blocks what depends on it."""
    from jobs.definitions import build_defs

    monkeypatch.setenv("FORGELINE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("FORGELINE_SHM_ROOT", str(tmp_path / "shm"))
    defs = build_defs()
    job = defs.resolve_job_def("lifecycle")
    storage = LocalStorageResource(root=str(tmp_path / "store"))
    _land(storage, "d1", image_size=32)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("batches", ["d1"])
        first = job.execute_in_process(instance=instance, partition_key="d1")
        assert first.success
        evals = {e.check_name: e for e in first.get_asset_check_evaluations()}
        assert evals["held_out_accuracy"].passed
        md = first.asset_materializations_for_node("trained_model")[0].metadata
        assert md["test_accuracy"].value >= 0.97
        assert md["world_size"].value == 2 and md["device"].value == "cpu" and md["amp_dtype"].value == "bfloat16"
        assert md["epoch_latency_count"].value == md["epochs"].value == 15
        assert md["curves"].value.count("data:image/svg+xml") == 2  # loss and accuracy charts
        assert md["resumed_from_epoch"].value == 0
        pmd = first.asset_materializations_for_node("preprocessed")[0].metadata
        assert pmd["samples_train"].value == 1259 and pmd["images_per_s"].value > 0
        # observability: every stage's wall time, throughput and latency percentiles, utilization
        # where the GPU pool leased (here CPU ranks: the host CPU is sampled)
        _assert_timed(pmd, "batch_latency", "images_per_s")
        _assert_timed(md, "step_latency", "samples_per_s")
        assert md["step_latency_count"].value == 15 * (1259 // 2 // 64)  # every optimizer step, rank 0
        for m in (pmd, md):
            assert m["cpu_util_mean"].value >= 0 and m["cpu_samples"].value >= 1
        _assert_timed(first.asset_materializations_for_node("exported_model")[0].metadata, "shard_latency", "mb_per_s")
        # packaging: bit-exact export, quantization within the gate, compile artifacts cached
        assert evals["loads_back_bit_exact"].passed and evals["accuracy_gate"].passed
        qmd = first.asset_materializations_for_node("quantized_model")[0].metadata
        assert qmd["int8_drop_points"].value <= 0.5 and qmd["int4_drop_points"].value <= 2.0
        assert 0.2 < qmd["int8_size_ratio"].value < 0.3 and qmd["int4_size_ratio"].value < 0.2
        _assert_timed(qmd, "tensor_latency", "tensors_per_s")
        assert qmd["int8_seconds"].value > 0 and qmd["int4_seconds"].value > 0
        cmd = first.asset_materializations_for_node("compile_artifacts")[0].metadata
        assert cmd["hit"].value is False and cmd["artifact_bytes"].value > 0 and cmd["kind"].value == "aoti"
        _assert_timed(cmd, "op_latency", "mb_per_s")
        assert cmd["compile_seconds"].value > 0 and cmd["save_seconds"].value > 0
        assert cmd["golden_max_abs_diff"].value <= 1e-4  # the compiled program reproduced the export
        store = storage.client()
        version = first.asset_materializations_for_node("exported_model")[0].metadata["version"].value
        # what the step stored is what `forgeline serve --compile` loads: the server starts on a hit
        from pipeline import compile_cache
        from pipeline.serving import loader as serving_loader

        served = serving_loader.load_version(store, "digits", version, compile=True, cache=compile_cache.configured(store))
        assert served.compile["hit"] and served.compile["kind"] == "aoti" and served.compile["key"] == cmd["key"].value
        serving_loader.release(served)
        assert store.exists(f"models/digits/{version}/manifest.json")
        assert store.exists(f"models/digits-int8/{version}/manifest.json")
        # promotion: past both gates the version (and its variants) is production, golden outputs recorded
        from pipeline import export, promotion

        assert promotion.production(store, "digits")["version"] == version
        assert promotion.resolve(store, "digits-int4", "production") == version
        assert first.asset_materializations_for_node("promoted_model")[0].metadata["version"].value == version
        golden = export.read_golden(store, "digits", version)
        assert golden["input"].shape == (8, 1, 28, 28) and golden["output"].shape == (8, 10)
        assert export.read_golden(store, "digits-int4", version)["input"].equal(golden["input"])
        # serving: the version is in the shm tier, byte-identical
        smd = first.asset_materializations_for_node("shm_prewarm")[0].metadata
        assert smd["hit"].value is False and smd["version"].value == version
        _assert_timed(smd, "file_latency", "mb_per_s")
        warm = tmp_path / "shm" / "models" / "digits" / version
        for shard in json.loads((warm / "manifest.json").read_text())["shards"]:
            assert (warm / shard["file"]).read_bytes() == store.read(f"models/digits/{version}/{shard['file']}")

        again = job.execute_in_process(instance=instance, partition_key="d1")
        md2 = again.asset_materializations_for_node("trained_model")[0].metadata
        assert md2["resumed_from_epoch"].value == 15  # nothing left to train: same checkpoint
        assert md2["test_accuracy"].value == md["test_accuracy"].value
        # same weights → the same version (verified, not republished), the same compile key → the
        # artifacts come from the cache, and the version is already warm
        emd2 = again.asset_materializations_for_node("exported_model")[0].metadata
        assert emd2["version"].value == version and emd2["reused"].value is True
        assert again.asset_materializations_for_node("quantized_model")[0].metadata["int8_reused"].value is True
        assert again.asset_materializations_for_node("compile_artifacts")[0].metadata["hit"].value is True
        assert again.asset_materializations_for_node("shm_prewarm")[0].metadata["hit"].value is True
        assert export.list_versions(store, "digits") == [version]

        # an impossible gate fails the blocking check and nothing downstream of it runs
        strict = {"ops": {"quantized_model": {"config": {"min_accuracy": 1.0}}}}
        gated = job.execute_in_process(instance=instance, partition_key="d1", run_config=strict, raise_on_error=False)
        assert not gated.success
        gate = next(e for e in gated.get_asset_check_evaluations() if e.check_name == "accuracy_gate")
        assert not gate.passed and "int4: accuracy" in str(gate.metadata["failures"].value)
        from jobs.runs import run_failure  # the CLI's one line names the check and what it found

        line = run_failure(instance, gated.run_id)
        assert line.startswith("step quantized_model: blocking check quantized_model:accuracy_gate failed (int"), line
        assert "is under min_accuracy 1.0" in line, line
        assert not gated.asset_materializations_for_node("compile_artifacts")
        assert not gated.asset_materializations_for_node("promoted_model")
        assert [h["version"] for h in promotion.history(store, "digits")] == [version, version]  # runs 1 and 2
        assert export.read_manifest(store, "digits-int4", version)["rejected"]  # the variant that failed
        assert export.latest_version(store, "digits-int4") is None
        assert promotion.resolve(store, "digits", "production") == version  # production stays where it was


def test_new_version_sensor_requests_one_prewarm_per_version(tmp_path, instance):
    import torch

    from jobs.serve import new_model_version
    from pipeline import export, promotion
    from pipeline.models import build_model
    from resources.storage import ShmStorageResource

    storage = LocalStorageResource(root=str(tmp_path / "store"))
    shm = ShmStorageResource(root=str(tmp_path / "shm"))
    resources = {"storage": storage, "shm": shm}
    assert isinstance(new_model_version(dg.build_sensor_context(instance=instance, resources=resources)), dg.SkipReason)

    torch.manual_seed(0)
    source = export.from_module(build_model("digits_cnn"), architecture="digits_cnn")
    v1 = export.export(source, storage.client(), "digits", "v1")["version"]
    msg = new_model_version(dg.build_sensor_context(instance=instance, resources=resources)).skip_message
    assert msg == "digits/production: nothing has been promoted"  # published is not enough: it follows the alias
    promotion.promote(storage.client(), "digits", v1)
    req = new_model_version(dg.build_sensor_context(instance=instance, resources=resources))
    assert req.run_key == "prewarm:digits/v1"
    assert req.run_config == {"ops": {"shm_prewarm": {"config": {"version": v1}}}}

    shm.tier().prewarm(storage.client(), "digits", v1)  # what the requested run does
    msg = new_model_version(dg.build_sensor_context(instance=instance, resources=resources)).skip_message
    assert msg == f"digits: production {v1} is already warm"
    storage.client().delete(f"{export.version_prefix('digits', v1)}/manifest.json")  # production not servable
    msg = new_model_version(dg.build_sensor_context(instance=instance, resources=resources)).skip_message
    assert msg.startswith(f"digits/production is {v1}, which is not servable: ") and "manifest" in msg, msg


def test_cli_load_prefers_the_shm_copy(tmp_path, monkeypatch, capsys):
    from jobs import cli
    from pipeline import export
    from pipeline.models import build_model
    from resources.storage import ShmStorageResource

    monkeypatch.setenv("FORGELINE_STORAGE_ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("FORGELINE_SHM_ROOT", str(tmp_path / "shm"))
    store = LocalStorageResource(root=str(tmp_path / "store")).client()
    model = build_model("digits_cnn")
    export.export(export.from_module(model, architecture="digits_cnn"), store, "digits", "v1")

    def load_json() -> dict:
        assert cli.main(["load", "digits/latest", "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    cold = load_json()
    assert cold["from"] == "remote" and cold["tensors"] == len(model.state_dict())
    assert cold["bytes"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert {"seconds", "gbps"} <= cold.keys()
    assert cold["chunk_latency_count"] >= 1 and cold["chunk_latency_p99_ms"] > 0
    ShmStorageResource(root=str(tmp_path / "shm")).tier().prewarm(store, "digits", "v1")
    assert load_json()["from"] == "shm"
