"""bench/s3.py's ``--tail``: the hold it puts on ranged GETs (bench/loaders.py ``add_tail``), against
radosgw. The bench's numbers live in BENCHMARKS.md, not here."""

from __future__ import annotations

import time

from bench.loaders import add_tail


def test_tail_holds_every_nth_ranged_get_and_nothing_else(s3_storage):
    client, bucket = s3_storage.client, s3_storage.bucket
    add_tail(client, 2, 1000)
    t = time.perf_counter()
    client.put_object(Bucket=bucket, Key="data/blob", Body=b"x" * 4096)
    client.head_object(Bucket=bucket, Key="data/blob")
    assert time.perf_counter() - t < 1.0  # a PUT and a HEAD are never held

    took, whole = [], []
    for i in range(6):
        t = time.perf_counter()
        client.get_object(Bucket=bucket, Key="data/blob")["Body"].read()  # not ranged: neither held nor counted
        whole.append(time.perf_counter() - t)
        t = time.perf_counter()
        body = client.get_object(Bucket=bucket, Key="data/blob", Range=f"bytes={i}-{i + 9}")["Body"].read()
        took.append(time.perf_counter() - t)
        assert body == b"x" * 10
    assert max(whole) < 1.0, whole
    held = [i + 1 for i, s in enumerate(took) if s >= 1.0]
    assert held == [2, 4, 6], took
