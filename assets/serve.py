"""Serving-side assets: ``shm_prewarm`` puts a published version into the node's /dev/shm tier so
the loader starts from RAM."""

from typing import Optional

import dagster as dg
from pydantic import Field

from assets.package import quantized_model
from pipeline import metrics, package
from resources.storage import ShmStorageResource, StorageResource


class PrewarmConfig(dg.Config):
    version: Optional[str] = Field(default=None, description="Version to pre-warm (default: the exported one).")
    quantized: list[str] = Field(default=[], description="Also pre-warm these quantized variants, e.g. ['int8'].")
    pin: bool = Field(default=False, description="Protect the version from LRU eviction.")


@dg.asset(group_name="serve", kinds={"shm"}, deps=[quantized_model])
def shm_prewarm(context: dg.AssetExecutionContext, config: PrewarmConfig, exported_model: dict,
                storage: StorageResource, shm: ShmStorageResource) -> dg.MaterializeResult:
    """Copy the model version (verified, atomically, within the tier's budget) into /dev/shm.
    Downstream of the quantization gate: a version that failed it is never pre-warmed."""
    tier, store = shm.tier(), storage.client()
    version = config.version or exported_model["version"]
    names = [exported_model["model"]] + [package.quantized_name(exported_model["model"], q) for q in config.quantized]
    reports = [tier.prewarm(store, name, version, pin=config.pin) for name in names]
    return dg.MaterializeResult(metadata={
        "version": version,
        "models": dg.MetadataValue.json(names),
        "hit": all(r.hit for r in reports),
        "bytes_copied": sum(r.bytes for r in reports),
        "seconds": sum(r.seconds for r in reports),
        "gbps": sum(r.bytes for r in reports) / 1e9 / max(sum(r.seconds for r in reports), 1e-9),
        "mb_per_s": sum(r.bytes for r in reports) / 1e6 / max(sum(r.seconds for r in reports), 1e-9),
        **metrics.summary((s for r in reports for s in r.file_seconds), "file_latency"),
        "evicted": dg.MetadataValue.json([e for r in reports for e in r.evicted]),
        "tier_used_bytes": tier.used_bytes(),
        "path": dg.MetadataValue.path(str(reports[0].path)),
    })
