"""An IO manager that keeps asset values (small JSON records: dataset descriptions, model
records) in the storage resource, so they travel between steps and pods the same way data does."""

import json

import dagster as dg

from pipeline.storage import join
from resources.storage import StorageResource


class StorageJsonIOManager(dg.ConfigurableIOManager):
    """Values must be JSON-serializable; each lands at ``<prefix>/<asset key>[/<partition>].json``."""

    storage: dg.ResourceDependency[StorageResource]
    prefix: str = "assets"

    def _key(self, context: dg.OutputContext | dg.InputContext) -> str:
        """Both contexts expose the asset key and (when partitioned) its partition directly."""
        path = "/".join(context.asset_key.path)
        if context.has_asset_partitions:
            path = join(path, context.asset_partition_key)
        return join(self.prefix, path + ".json")

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is None:
            return
        key = self._key(context)
        self.storage.client().write_atomic(key, json.dumps(obj, indent=1, sort_keys=True).encode())
        context.add_output_metadata({"value_uri": dg.MetadataValue.path(self.storage.client().uri(key))})

    def load_input(self, context: dg.InputContext):
        key = self._key(context)
        return json.loads(self.storage.client().read(key))
