"""Weight loading side by side: forgeline vs safetensors, Run:ai streamer, fastsafetensors and
InstantTensor (whichever are installed: `pip install -e ".[bench]"`, plus `instanttensor` on a GPU;
benchmark-only, not runtime dependencies), each run in a fresh process.

    .venv/bin/python bench/loaders.py                          # CPU machine: ~1 GB checkpoint
    .venv/bin/python bench/loaders.py --size-gb 16 --device cuda   # H100: Llama-3-8B-sized, 4 shards

Checkpoint: Llama-3-8B tensor shapes (hidden 4096, MLP 14336, vocab 128256), bf16, random values,
as many layers as fit ``--size-gb``, in 4 shards. Sources: /dev/shm (tmpfs), warm page cache,
cold (every file dropped with posix_fadvise DONTNEED before the run), S3 (Ceph's RADOS Gateway on
loopback, tests/rgw.py; bench/s3.py compares the S3 paths with raw boto3).
Time = until every tensor is resident on the device: for CUDA after torch.cuda.synchronize(); for
CPU after one byte of every page was read (an mmap'ed "load" that never touches the data would
otherwise look instantaneous). Targets on the H100: shm → GPU ≥ 48 GB/s, warm → GPU
≥ 40 GB/s, cold ≥ 95% of parallel pread, S3 ≥ 1.5x Run:ai; on CPU: ≥ the best peer.

``--fresh-process`` adds what a serving cold start pays, forgeline vs ``safetensors.torch.load_file``
side by side (interleaved, ``--repeat`` rounds, min and median): a new interpreter that imports
the loader and loads the warm checkpoint to CPU, timed from just before the process is started
to tensors returned ("ready") and to every page resident ("touched"); the child also reports
its import and load times. Only those two loaders, on CPU.

    .venv/bin/python bench/loaders.py --size-gb 1.5 --sources --fresh-process --repeat 7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, MLP, VOCAB, KV = 4096, 14336, 128256, 1024


def make_checkpoint(out: Path, size_gb: float) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    layer = {f"self_attn.{n}.weight": s for n, s in
             (("q_proj", (HIDDEN, HIDDEN)), ("k_proj", (KV, HIDDEN)), ("v_proj", (KV, HIDDEN)), ("o_proj", (HIDDEN, HIDDEN)))}
    layer |= {f"mlp.{n}.weight": s for n, s in (("gate_proj", (MLP, HIDDEN)), ("up_proj", (MLP, HIDDEN)), ("down_proj", (HIDDEN, MLP)))}
    layer |= {"input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,)}
    per_layer = sum(torch.Size(s).numel() for s in layer.values()) * 2
    embed = VOCAB * HIDDEN * 2
    with_embed = size_gb * 1e9 >= 2 * embed + per_layer  # small CPU checkpoints: decoder layers only
    layers = max(1, int((size_gb * 1e9 - (2 * embed if with_embed else 0)) / per_layer))
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))] if with_embed else []
    for i in range(layers):
        names += [(f"model.layers.{i}.{k}", s) for k, s in layer.items()]
    names += [("model.norm.weight", (HIDDEN,))] + ([("lm_head.weight", (VOCAB, HIDDEN))] if with_embed else [])
    out.mkdir(parents=True, exist_ok=True)
    gen = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers for 16 GB: seconds on a GPU, minutes on CPUs
    g = torch.Generator(device=gen).manual_seed(0)
    shards, per = [], -(-len(names) // 4)
    for k in range(4):
        part = names[k * per:(k + 1) * per]
        tensors = {n: torch.randn(s, generator=g, dtype=torch.float32, device=gen).to(torch.bfloat16).cpu() for n, s in part}
        path = out / f"model-{k + 1:05d}-of-00004.safetensors"
        save_file(tensors, str(path))
        shards.append(path)
    return shards


def drop_cache(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def touch(tensors, device: str) -> int:
    """Make every tensor resident: synchronize on CUDA, read a byte per page on CPU."""
    import torch

    n = 0
    for t in tensors.values():
        n += t.numel() * t.element_size()
        if device == "cpu" and t.numel():
            t.reshape(-1).view(torch.uint8)[::4096].sum()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n


def run_loader(name: str, files: list[str], device: str, s3: dict | None) -> dict:
    import torch

    if device.startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device=device)  # CUDA context before the clock, for every loader alike
    # Imports before the clock too: each loader is timed on loading, not on importing itself.
    __import__({"forgeline": "pipeline.loading", "safetensors": "safetensors.torch", "runai": "runai_model_streamer",
                "fastsafetensors": "fastsafetensors", "instanttensor": "instanttensor"}[name])
    if s3:
        __import__("pipeline.storage.s3" if name == "forgeline" else "boto3")
    t, cpu0, box0 = time.perf_counter(), os.times(), machine_cpu()
    tensors: dict = {}
    setup = setup_cpu = None
    if name == "forgeline":
        from pipeline.loading import load

        if s3:
            from pipeline.storage.s3 import S3Storage

            store = S3Storage(s3["bucket"], s3["prefix"], endpoint_url=s3["endpoint"], region_name="us-east-1")
            # Building the storage (a boto3 client: ~0.1 s in a fresh process) is timed like
            # every loader's client, and also reported apart: bench/s3.py compares the load
            # alone with raw GETs, whose client is built before their clock.
            setup, setup_cpu = time.perf_counter() - t, cpu_since(cpu0)
            if s3.get("tail"):
                add_tail(store.client, *s3["tail"])
            tensors = load(f"s3://{s3['bucket']}/{s3['prefix']}", device, storage=store)
        else:
            for f in files:
                tensors |= load(f, device)
    elif name == "safetensors":
        from safetensors.torch import load_file

        if s3:
            import boto3

            c = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1")
            from safetensors.torch import load

            for f in files:
                tensors |= {k: v.to(device) for k, v in load(c.get_object(Bucket=s3["bucket"], Key=f"{s3['prefix']}/{Path(f).name}")["Body"].read()).items()}
        else:
            for f in files:
                tensors |= {k: v.to(device) for k, v in load_file(f).items()}
    elif name == "runai":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as st:
            for f in files:
                st.stream_file(f if not s3 else f"s3://{s3['bucket']}/{s3['prefix']}/{Path(f).name}")
                for k, v in st.get_tensors():
                    tensors[k] = v.to(device)  # the streamer reuses its buffer: .to() copies (clone on CPU)
                    if device == "cpu":
                        tensors[k] = tensors[k].clone()
    elif name == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        loader = SafeTensorsFileLoader(SingleGroup(), device, nogds=True)
        loader.add_filenames({0: files})
        fb = loader.copy_files_to_device()
        for k in fb.key_to_rank_lidx:
            tensors[k] = fb.get_tensor(k)
        if device == "cpu":
            tensors = {k: v.clone() for k, v in tensors.items()}  # the file buffer is freed with the loader
        fb.close()
        loader.close()
    elif name == "instanttensor":
        import instanttensor

        tensors = dict(instanttensor.load(files, device=device))
    n = touch(tensors, device)
    secs = time.perf_counter() - t
    # CPU time of this process (every thread, user + system) over the same span
    out = {"seconds": secs, "bytes": n, "gbps": n / secs / 1e9, "cpu_seconds": cpu_since(cpu0),
           "machine_cpu_seconds": machine_cpu() - box0}
    if setup is not None:
        out["setup_seconds"], out["setup_cpu_seconds"] = setup, setup_cpu
    return out


def add_tail(client, every: int, ms: float) -> None:
    """Hold every ``every``-th ranged GET the boto3 ``client`` sends for ``ms`` milliseconds
    before it goes out: the slow tail of a real object store's requests, which loopback lacks
    (a load that waits on its oldest request idles the others meanwhile)."""
    import itertools

    seen = itertools.count(1)

    def hold(request, **_):
        if request.method == "GET" and "Range" in request.headers and next(seen) % every == 0:
            time.sleep(ms / 1e3)

    client.meta.events.register("before-send", hold)


def machine_cpu() -> float:
    """Seconds of CPU the whole machine has spent so far (every core; not idle, not waiting on
    I/O): beside a process's own, it shows what a local server (radosgw) spent for it."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def cpu_since(t0: os.times_result) -> float:
    """CPU seconds of this process (every thread, user + system) since ``os.times()`` gave ``t0``."""
    t1 = os.times()
    return (t1.user - t0.user) + (t1.system - t0.system)


# The child of --fresh-process: started as `python -c FRESH_CHILD <loader> <files json>`; prints
# wall-clock (time.time) stamps the parent subtracts its own start stamp from.
FRESH_CHILD = """
import json, sys, time
t_main = time.time()
loader, files = sys.argv[1], json.loads(sys.argv[2])
import torch  # both loaders need it: timed apart, so the loader's own weight shows
t_torch = time.time()
if loader == "forgeline":
    from pipeline.loading import load
else:
    from safetensors.torch import load_file as load
t_imported = time.time()
tensors = {}
for f in files:
    tensors |= load(f)
t_ready = time.time()
for t in tensors.values():
    if t.numel():
        t.reshape(-1).view(torch.uint8)[::4096].sum()
t_touched = time.time()
print(json.dumps({"main": t_main, "torch": t_torch, "imported": t_imported, "ready": t_ready, "touched": t_touched,
                  "modules": len(sys.modules)}))
"""


def fresh_process(files: list[Path], repeat: int, src: Path = ROOT, bytecode: bool = False) -> list[dict]:
    """forgeline vs safetensors, each round both (alternating which goes first), each in a new
    interpreter; warm page cache (the files are read once before each round). ``src``: the source
    tree whose ``pipeline`` is imported (another commit's ``git archive``, to compare).
    ``bytecode``: the children keep compiled bytecode in a private ``pycache_prefix`` (warmed by a
    first, unmeasured run); otherwise they run as this environment says (PYTHONDONTWRITEBYTECODE=1
    here and in the image: forgeline's modules are compiled from source at every start unless they
    come from an installed, byte-compiled copy)."""
    import statistics
    import tempfile

    env = dict(os.environ)
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="forgeline-bench-pycache-")
        for loader in ("forgeline", "safetensors"):
            subprocess.run([sys.executable, "-c", FRESH_CHILD, loader, json.dumps([str(files[0])])],
                           capture_output=True, cwd=src, env=env, check=True)

    runs: dict[str, list[dict]] = {"forgeline": [], "safetensors": []}
    for i in range(repeat):
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
        order = ["forgeline", "safetensors"] if i % 2 == 0 else ["safetensors", "forgeline"]
        for loader in order:
            t0 = time.time()
            out = subprocess.run([sys.executable, "-c", FRESH_CHILD, loader, json.dumps([str(f) for f in files])],
                                 capture_output=True, text=True, cwd=src, env=env, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[loader].append({"startup": r["main"] - t0, "torch": r["torch"] - r["main"],
                                 "import": r["imported"] - r["torch"],
                                 "load": r["ready"] - r["imported"], "ready": r["ready"] - t0,
                                 "touched": r["touched"] - t0, "modules": r["modules"]})
    rows = []
    for loader, rs in runs.items():
        row = {"source": "fresh-process" + ("-bytecode" if bytecode else ""), "loader": loader, "runs": rs}
        for k in ("startup", "torch", "import", "load", "ready", "touched"):
            vals = [r[k] for r in rs]
            row[f"{k}_min"], row[f"{k}_median"] = min(vals), statistics.median(vals)
        row["modules"] = rs[0]["modules"]
        rows.append(row)
    return rows


def available(device: str, s3: bool) -> list[str]:
    import importlib.util

    mods = {"runai": "runai_model_streamer", "fastsafetensors": "fastsafetensors", "instanttensor": "instanttensor"}
    out = ["forgeline", "safetensors"]
    for name, mod in mods.items():
        if importlib.util.find_spec(mod) is None:
            continue
        if name == "instanttensor" and device == "cpu":
            continue  # GPU only
        if s3 and name == "runai" and importlib.util.find_spec("runai_model_streamer_s3") is None:
            continue
        if s3 and name in ("fastsafetensors", "instanttensor"):
            continue  # no S3 support
        out.append(name)
    return out


def main() -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--root", default=str(ROOT / ".forgeline" / "bench" / "loaders"))
    ap.add_argument("--sources", nargs="*", default=["shm", "warm", "cold", "s3"])
    ap.add_argument("--fresh-process", action="store_true",
                    help="also time a fresh interpreter: process start → tensors on CPU, forgeline vs safetensors")
    ap.add_argument("--fresh-src", default=str(ROOT),
                    help="source tree --fresh-process imports pipeline from (e.g. `git archive` of an older commit)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--child-timeout", type=float, default=None, help="seconds per fresh loader process (then an error row)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(run_loader(spec["loader"], spec["files"], a.device, spec.get("s3"))))
        return 0

    disk = Path(a.root) / f"llama-{a.size_gb:g}gb"
    files = sorted(disk.glob("*.safetensors")) or make_checkpoint(disk, a.size_gb)
    size = sum(f.stat().st_size for f in files)
    rows, server = [], None
    for source in a.sources:
        s3 = None
        if source == "shm":
            shm = Path("/dev/shm/forgeline-bench")
            shm.mkdir(exist_ok=True)
            src = [shm / f.name for f in files]
            for f, d in zip(files, src):
                if not d.exists():
                    shutil.copyfile(f, d)
        elif source == "s3":
            from tests.rgw import RGWCluster  # the same real server the tests use

            size_all = sum(f.stat().st_size for f in files)
            server = RGWCluster(memstore_bytes=2 * size_all + (1 << 30)).start()
            endpoint = server.endpoint
            os.environ.update(server.env())
            os.environ.update({"RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0", "AWS_EC2_METADATA_DISABLED": "true"})
            c = server.client()
            c.create_bucket(Bucket="bench")
            for f in files:
                c.upload_file(str(f), "bench", f"ckpt/{f.name}")
            s3 = {"bucket": "bench", "prefix": "ckpt", "endpoint": endpoint}
            os.environ["FORGELINE_S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"] = endpoint
            src = files
        else:
            src = files
        for loader in available(a.device, s3 is not None):
            best = None
            for _ in range(a.repeat):
                if source == "cold":
                    drop_cache(src)
                elif source == "warm":
                    for f in src:
                        with open(f, "rb") as fh:
                            while fh.read(64 << 20):
                                pass
                spec = json.dumps({"loader": loader, "files": [str(f) for f in src], "s3": s3})
                try:
                    out = subprocess.run([sys.executable, __file__, "--device", a.device, "--child", spec],
                                         capture_output=True, text=True, timeout=a.child_timeout)
                except subprocess.TimeoutExpired:
                    out = subprocess.CompletedProcess([], 1, "", f"timeout after {a.child_timeout:g} s")
                if out.returncode:
                    res = {"error": out.stderr.strip().splitlines()[-1][:120]}
                else:
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                if best is None or res.get("seconds", 1e9) < best.get("seconds", 1e9):
                    best = res
            rows.append({"source": source, "loader": loader, **best})
        if source == "s3" and server is not None:
            server.stop()
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    table = Table(title=f"load {size / 1e9:.2f} GB ({len(files)} shards, bf16) → {a.device} on {name}; best of {a.repeat}")
    for col in ("source", "loader", "seconds", "GB/s"):
        table.add_column(col, justify="right" if col in ("seconds", "GB/s") else "left")
    for r in rows:
        table.add_row(r["source"], r["loader"], f"{r['seconds']:.3f}" if "seconds" in r else r.get("error", ""),
                      f"{r['gbps']:.2f}" if "gbps" in r else "")
    if rows:
        Console().print(table)
    for bytecode in (False, True) if a.fresh_process else ():
        fresh = fresh_process(files, a.repeat, Path(a.fresh_src), bytecode)
        ft = Table(title=f"fresh process → {size / 1e9:.2f} GB on CPU (warm page cache), ms from process start, "
                         f"{'bytecode cached' if bytecode else 'as the environment runs'}; min / median of {a.repeat}")
        for col in ("loader", "interpreter", "import torch", "import loader", "load", "tensors ready",
                    "pages touched", "modules"):
            ft.add_column(col, justify="left" if col == "loader" else "right")
        for r in fresh:
            ft.add_row(r["loader"], *(f"{1e3 * r[k + '_min']:.0f} / {1e3 * r[k + '_median']:.0f}"
                                      for k in ("startup", "torch", "import", "load", "ready", "touched")),
                       str(r["modules"]))
        Console().print(ft)
        fl, st = fresh
        console = Console()
        console.print(f"tensors ready, forgeline / safetensors: {fl['ready_median'] / st['ready_median']:.2f}x (median), "
                      f"{fl['ready_min'] / st['ready_min']:.2f}x (min); loader import + load beyond torch: "
                      f"{1e3 * (fl['import_median'] + fl['load_median']):.1f} ms vs "
                      f"{1e3 * (st['import_median'] + st['load_median']):.1f} ms (median)")
        rows += fresh
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "bytes": size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
