"""Pre-warm job and the sensor that runs it when a new model version is published."""

import dagster as dg

from pipeline import promotion, settings
from resources.storage import ShmStorageResource, StorageResource

prewarm_job = dg.define_asset_job(
    "prewarm", selection=dg.AssetSelection.assets("shm_prewarm"),
    description="Copy the production (or a given) model version into this node's /dev/shm tier.",
)


@dg.sensor(job=prewarm_job, minimum_interval_seconds=30,
           description="Requests `prewarm` for each newly promoted production version of the model that is not "
                       "in the shm tier yet (run_key per version: one pre-warm per version).")
def new_model_version(context: dg.SensorEvaluationContext, storage: StorageResource, shm: ShmStorageResource):
    model = settings.model_name()
    try:  # the alias and the version's manifest, no stats: the pre-warm checks every file it lands
        version = promotion.resolve_manifest(storage.client(), model, promotion.ALIAS, files=False)[0]
    except promotion.PromotionError as e:  # nothing promoted, or production is not servable: says which
        return dg.SkipReason(str(e))
    if shm.tier().complete(model, version):
        return dg.SkipReason(f"{model}: production {version} is already warm")
    return dg.RunRequest(run_key=f"prewarm:{model}/{version}",
                         run_config={"ops": {"shm_prewarm": {"config": {"version": version}}}})
