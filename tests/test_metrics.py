"""The latency helper: percentiles of known inputs, empty input, the thread-safe recorder."""

import threading
import time

import pytest

from pipeline.metrics import Latencies, summary


def test_percentiles_of_known_inputs():
    s = summary([i / 1000 for i in range(1, 101)], "step_latency")  # 1 ms … 100 ms
    assert s["step_latency_p50_ms"] == pytest.approx(50.5)
    assert s["step_latency_p95_ms"] == pytest.approx(95.05)
    assert s["step_latency_p99_ms"] == pytest.approx(99.01)
    assert s["step_latency_max_ms"] == pytest.approx(100.0)
    assert s["step_latency_count"] == 100
    assert all(isinstance(v, float) for k, v in s.items() if k.endswith("_ms"))


def test_one_value_and_order_do_not_matter():
    assert summary([0.002], "x") == {"x_p50_ms": 2.0, "x_p95_ms": 2.0, "x_p99_ms": 2.0, "x_max_ms": 2.0, "x_count": 1}
    assert summary([0.3, 0.1, 0.2], "x") == summary([0.1, 0.2, 0.3], "x")


def test_empty_input_gives_no_keys():
    assert summary([], "x") == {}
    assert summary(iter(()), "x") == {}
    assert Latencies().summary("x") == {}


def test_recorder_from_many_threads():
    rec = Latencies()

    def work():
        for _ in range(500):
            rec.add(0.001)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rec) == 4000 and rec.summary("x")["x_count"] == 4000


def test_time_and_time_each():
    rec = Latencies()
    with rec.time():
        time.sleep(0.01)
    with pytest.raises(ValueError), rec.time():  # a block that raises is timed too
        raise ValueError

    def slow():
        for i in range(3):
            time.sleep(0.005)
            yield i

    each = Latencies()
    assert list(each.time_each(slow())) == [0, 1, 2]
    assert len(rec) == 2 and rec.values[0] >= 0.01
    assert len(each) == 3 and min(each.values) >= 0.005
