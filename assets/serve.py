"""Serving-side assets: ``shm_prewarm`` puts the production version (the promotion alias) into the
node's /dev/shm tier so the loader starts from RAM."""

from typing import Optional

import dagster as dg
from pydantic import Field, field_validator

from assets.package import known_schemes
from pipeline import metrics, package, promotion
from resources.storage import ShmStorageResource, StorageResource


class PrewarmConfig(dg.Config):
    version: Optional[str] = Field(default=None, description="Version to pre-warm (default: production).")
    quantized: list[str] = Field(default=[], description="Also pre-warm these quantized variants, e.g. ['int8'].")
    pin: bool = Field(default=False, description="Protect the version from LRU eviction.")

    @field_validator("quantized")
    @classmethod
    def _known_schemes(cls, v):
        return known_schemes(v, "quantized variant")


@dg.asset(group_name="serve", kinds={"shm"})
def shm_prewarm(context: dg.AssetExecutionContext, config: PrewarmConfig, promoted_model: dict,
                storage: StorageResource, shm: ShmStorageResource) -> dg.MaterializeResult:
    """Copy the production version of the model (verified, atomically, within the tier's budget)
    into /dev/shm. It follows the promotion alias, which only moves past the blocking gates: a
    version that failed them is never pre-warmed."""
    tier, store = shm.tier(), storage.client()
    model = promoted_model["model"]
    version = config.version or promotion.resolve(store, model, promotion.ALIAS)
    names = [model] + [package.quantized_name(model, q) for q in config.quantized]
    reports = []
    for name in names:  # never evicting what this run copied: the variants come with their base, or fail
        reports.append(tier.prewarm(store, name, version, pin=config.pin, keep=[(n, version) for n in names]))
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
