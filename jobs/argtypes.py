"""argparse types for the CLI's numbers, sizes and ports: each refuses a bad value in one line that
says what it needs (``--port 70000``: not a port (0..65535)), before a command does anything."""

from __future__ import annotations

import argparse
import math


def size(text: str) -> int:
    """A positive byte count: ``1000``, ``100MB``, ``512MiB``, ``16Gi``."""
    from pipeline.settings import parse_size

    try:
        n = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
    return n


def number(kind, ok, need: str, what: str = "a number"):
    """An argparse type: ``kind(text)``, finite and passing ``ok``, else one line (``need``)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"{need}: {text!r}")
        return v

    return parse


def positive(kind):
    return number(kind, lambda v: v > 0, "must be positive")


non_negative = number(float, lambda v: v >= 0, "must be zero or more")
rate = number(float, lambda v: 0.0 <= v <= 1.0, "must be within 0..1")
port = number(int, lambda v: 0 <= v <= 65535, "not a port (0..65535)", what="a port")
