"""What a published model version looks like in storage: the manifest's format tag, the names of
its files, and the key under which a quantized shard records how to dequantize it. The writer
(:mod:`pipeline.export`, :mod:`pipeline.quantize`) and the reader (:mod:`pipeline.loading`) both
take them from here; this module imports nothing, so a loader cold start pays nothing for it."""

FORMAT = "forgeline.model/1"  # the manifest's "format"
DEFAULT_ROOT = "models"  # versions live under <root>/<model>/<version>/
MANIFEST_NAME = "manifest.json"  # written last: its presence publishes the version
INDEX_NAME = "model.safetensors.index.json"  # Hugging Face's shard index
SINGLE_SHARD_NAME = "model.safetensors"
GOLDEN_NAME = "golden.safetensors"  # a fixed batch and the outputs recorded at export
QUANT_METADATA_KEY = "forgeline.quant"  # under safetensors' str→str ``__metadata__``
