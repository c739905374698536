"""forgeline's fast loader: safetensors weights into CPU memory or onto a CUDA device, from local
files, /dev/shm, network filesystems, S3 or a published ``<model>/<version>``.

Usage::

    from pipeline.loading import load, load_with_report

    sd = load("model.safetensors")                                # CPU: zero-copy, memory-mapped
    sd = load("ckpt_dir/", device="cuda:0", dtype=torch.bfloat16)  # folder / index of shards
    sd = load("s3://bucket/models/digits/v1")                      # S3 prefix (published version)
    sd, rep = load_with_report("digits/latest", "cuda", storage=store, verify=True)
    print(rep.summary())                                           # read/copy/total seconds, GB/s

The package: ``api`` (load, the report), ``sources`` (what to load), ``header`` (validation),
``probe`` (storage kind and tuning), ``plan`` (read requests) and ``staged`` (the copy pipeline).
Strategies and measurements: docs/loading.md. It never imports dagster.
"""

from pipeline.loading.api import LoadReport, load, load_with_report, module_slots
from pipeline.loading.header import LoadError
from pipeline.loading.probe import probe

__all__ = ["LoadError", "LoadReport", "load", "load_with_report", "module_slots", "probe"]
