"""Pre-warm job and the sensor that runs it when a new model version is published."""

import dagster as dg

from assets.package import MODEL_NAME
from pipeline import export
from resources.storage import ShmStorageResource, StorageResource

prewarm_job = dg.define_asset_job(
    "prewarm", selection=dg.AssetSelection.assets("shm_prewarm"),
    description="Copy the latest (or a given) model version into this node's /dev/shm tier.",
)

WATCHED_MODEL = MODEL_NAME


@dg.sensor(job=prewarm_job, minimum_interval_seconds=30,
           description="Requests `prewarm` for each newly published version of the model that is not in the "
                       "shm tier yet (run_key per version: one pre-warm per version).")
def new_model_version(context: dg.SensorEvaluationContext, storage: StorageResource, shm: ShmStorageResource):
    version = shm.tier().needs_prewarm(storage.client(), WATCHED_MODEL)
    if version is None:
        latest = export.latest_version(storage.client(), WATCHED_MODEL)
        return dg.SkipReason(f"{WATCHED_MODEL}: {'no published version' if latest is None else latest + ' already warm'}")
    return dg.RunRequest(run_key=f"prewarm:{WATCHED_MODEL}/{version}",
                         run_config={"ops": {"shm_prewarm": {"config": {"version": version}}}})
