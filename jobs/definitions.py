"""The one ``Definitions`` object of the forgeline code location (loaded by ``workspace.yaml``)."""

import warnings

import dagster as dg

from assets import drift as drift_assets
from assets import ingest as ingest_assets
from assets import package as package_assets
from assets import rollout as rollout_assets
from assets import serve as serve_assets
from assets import train as train_assets
from jobs.automation import build_schedules, drift_retrain, record_run_failure, retrain_retry
from jobs.ingest import incoming_batches, ingest_job
from jobs.executor import executor_from_env
from jobs.serve import new_model_version, prewarm_job
from pipeline import settings
from resources.cache import compile_cache_from_env
from resources.gpu import gpu_pool_from_env
from resources.io import StorageJsonIOManager
from resources.storage import shm_from_env, storage_from_env

# Dagster's own resource initialization (pythonic resources with nested resources) reads the
# deprecated InitResourceContext.dagster_run itself; nothing of ours calls it.
warnings.filterwarnings("ignore", message=r"InitResourceContext\.dagster_run is deprecated",
                        category=DeprecationWarning, module=r"dagster\._core\.execution\.context\.init")

# Every stage that exists, end to end. `make demo` runs this job.
lifecycle_job = dg.define_asset_job(
    "lifecycle",
    selection=dg.AssetSelection.all(),  # partitioned by `batches`, inferred from the assets
    description="The whole lifecycle for one batch: every stage that exists, in dependency order.",
)

train_and_package_job = dg.define_asset_job(
    "train_and_package",
    # ...and, once promoted, the rollout to the model servers and what they serve (assets/rollout.py)
    selection=dg.AssetSelection.groups("train", "package") | dg.AssetSelection.assets("model_rollout", "served_models"),
    description="Preprocess every ingested batch, train, export, quantize, compile and cache the artifacts; "
                "promote, then wait until the model servers serve the new version.",
)


def build_defs() -> dg.Definitions:
    """Definitions with resources chosen from the environment at call time (see storage_from_env);
    a malformed ``FORGELINE_*`` setting stops them from loading, in one line naming it."""
    settings.check()
    storage = storage_from_env()
    gpu_pool = gpu_pool_from_env()
    assets = dg.load_assets_from_modules([ingest_assets, train_assets, package_assets, serve_assets,
                                                rollout_assets])
    return dg.Definitions(
        assets=assets,
        asset_checks=dg.load_asset_checks_from_modules([drift_assets]),
        executor=executor_from_env(gpu_pool, assets),  # FORGELINE_EXECUTOR=k8s: a pod per step (jobs/executor.py)
        jobs=[ingest_job, train_and_package_job, prewarm_job, lifecycle_job],
        schedules=build_schedules(),
        sensors=[incoming_batches, new_model_version, drift_retrain, retrain_retry, record_run_failure],
        resources={
            "storage": storage,
            "io_manager": StorageJsonIOManager(storage=storage),
            "gpu_pool": gpu_pool,
            "compile_cache": compile_cache_from_env(storage),
            "shm": shm_from_env(),
        },
    )


defs = build_defs()
