"""Training throughput: forgeline's trainer (torchrun, DDP, AMP, metrics, checkpoints — everything it
adds) against a bare PyTorch eager loop on the same model, batch and device, synthetic input.

    .venv/bin/python bench/train.py                       # CPU: digits_cnn 1x28x28, batch 64
    .venv/bin/python bench/train.py --model resnet50 --image-size 224 --batch-size 128   # GPU

Each variant runs in a fresh process; the first epoch is warm-up and excluded. On a GPU the bare loop
is run in fp32, tf32 and bf16 autocast (channels_last, SGD), like published reference numbers; forgeline
runs bf16 on one rank (NCCL). On CPU it also measures the DDP overhead of 2 gloo ranks vs 1 rank
with the same total cores. Targets (H100, ResNet-50, batch 128): forgeline ≥ 95% of bare bf16;
CPU: 2-rank DDP overhead ≤ 25%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bare(model_name: str, shape, classes: int, batch: int, steps: int, warmup: int, precision: str, device: str) -> float:
    """The reference loop: no DDP, no hooks, no metrics. Returns images/s."""
    import torch

    from pipeline.models import build_model

    torch.manual_seed(0)
    dev = torch.device(device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    model = build_model(model_name, **({"in_channels": shape[0], "num_classes": classes})).to(dev)
    x = torch.randn(batch, *shape, device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)
    if device == "cuda":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = precision == "bf16"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def forgeline(model_name: str, shape, classes: int, batch: int, steps: int, world: int, amp: str, device: str) -> float:
    from pipeline import train
    from pipeline.storage import LocalStorage

    with tempfile.TemporaryDirectory() as tmp:
        cfg = train.TrainConfig(epochs=2, batch_size=batch, amp=amp, optimizer="sgd", lr=0.01, model=model_name,
                                model_kwargs={"in_channels": shape[0], "num_classes": classes}, keep_checkpoints=1)
        res = train.launch(
            storage=LocalStorage(Path(tmp) / "s", fsync=False), shards={}, spec={}, config=cfg,
            checkpoint_prefix="bench", world_size=world, device_type=device, work_dir=Path(tmp) / "w",
            synthetic={"samples": steps * batch * world, "shape": list(shape), "classes": classes},
        )
    return res.history[-1]["samples_per_s"]  # epoch 1 is warm-up


def main() -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits_cnn")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=None)
    ap.add_argument("--classes", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    channels = a.channels or (1 if a.model == "digits_cnn" else 3)
    classes = a.classes or (10 if a.model == "digits_cnn" else 1000)
    shape = (channels, a.image_size, a.image_size)
    if a.child:
        kind, arg = a.child.split(":")
        if kind == "bare":
            v = bare(a.model, shape, classes, a.batch_size, a.steps, 10, arg, a.device)
        else:
            v = forgeline(a.model, shape, classes, a.batch_size, a.steps, int(arg), "bf16" if a.device == "cuda" else "fp32", a.device)
        print(json.dumps({"img_s": v}))
        return 0

    def run(child: str) -> float:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", child],
                             capture_output=True, text=True, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return json.loads(out.stdout.strip().splitlines()[-1])["img_s"]

    rows = []
    if a.device == "cuda":
        for p in ("fp32", "tf32", "bf16"):
            rows.append((f"bare eager {p}", run(f"bare:{p}")))
        rows.append(("forgeline bf16, 1 rank (NCCL DDP)", run("forgeline:1")))
        ref = rows[2][1]
    else:
        rows.append(("bare eager fp32", run("bare:fp32")))
        rows.append(("forgeline fp32, 1 rank (gloo DDP)", run("forgeline:1")))
        rows.append(("forgeline fp32, 2 ranks (gloo DDP)", run("forgeline:2")))
        ref = rows[0][1]
    name = torch.cuda.get_device_name() if a.device == "cuda" else f"{os.cpu_count()} CPUs"
    table = Table(title=f"training throughput: {a.model} {shape} batch {a.batch_size}/rank on {name}")
    table.add_column("variant")
    table.add_column("img/s", justify="right")
    table.add_column("vs reference", justify="right")
    for label, v in rows:
        table.add_row(label, f"{v:,.0f}", f"{v / ref:.0%}")
    Console().print(table)
    if a.device == "cpu":
        print(f"DDP overhead, 2 gloo ranks vs 1 (same cores): {1 - rows[2][1] / rows[1][1]:.1%} (target ≤ 25%)")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "rows": rows, "args": vars(a)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
