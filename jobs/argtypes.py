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


def device(text: str) -> str:
    """A torch device for ``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (whether this host has it:
    :func:`check_device`, once torch is imported)."""
    import re

    t = text.strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", t):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    return t


def compile_mode(text: str) -> str:
    """A torch.compile mode for ``--compile-mode``: one of ``pipeline.compile_cache.COMPILE_MODES``
    (imported only when serving parses it: that module imports torch)."""
    from pipeline.compile_cache import COMPILE_MODES

    if text not in COMPILE_MODES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch.compile mode: use {', '.join(COMPILE_MODES)}")
    return text


def check_device(device: str) -> None:
    """A CUDA ``device`` this host does not have is a one-line :class:`jobs.runs.UserError`."""
    if not device.startswith("cuda"):
        return
    import torch

    from jobs.runs import UserError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}, "
                        f"torch.cuda.is_available() is False); use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise UserError(f"--device {device}: this host has {count} CUDA device{'s' if count > 1 else ''} "
                        f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
