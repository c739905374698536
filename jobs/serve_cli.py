"""``forgeline serve``: the model server (Open Inference Protocol v2 over HTTP), and ``forgeline serve
status``: per-model latency, traffic, memory and swaps of a running one, from its ``/metrics``.

    forgeline serve [--models a,b] [--host 127.0.0.1] [--port 8000] [--device cpu] [--budget 2GiB]
                    [--max-batch-size 32] [--max-queue-delay-ms 0] [--compile] [--poll-s 2]
                    [--sample-rate 0.05] [--sample-window-s 300] [--sample-window-samples 10000]
    forgeline serve status [--url http://127.0.0.1:8000] [--json]

Storage and the /dev/shm tier come from the same settings as every other command
(``FORGELINE_STORAGE_ROOT`` / ``FORGELINE_S3_*``, ``FORGELINE_SHM_ROOT``...; see pipeline.settings);
``--compile`` uses the compile cache ``FORGELINE_COMPILE_CACHE`` selects.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
import types
import urllib.error
import urllib.request

from jobs import argtypes

DEFAULT_URL = "http://127.0.0.1:8000"


class _OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        # Left-over words would otherwise reach the top-level parser, which prints its usage too.
        ns, extras = argparse.ArgumentParser.parse_known_args(self, args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


def _models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--models needs at least one model name (a,b,c)")
    bad = [n for n in names if "/" in n]
    if bad:
        raise argparse.ArgumentTypeError(f"a model name, not a version path: {bad[0]!r}")
    return names


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``serve`` (and ``serve status``) on the CLI's subparsers."""
    s = sub.add_parser("serve", help="serve published models over HTTP (KServe/Triton v2 protocol)",
                       description=__doc__.split("\n\n")[0])
    # The CLI's subparsers make plain parsers: give this one the one-line behaviour.
    s.error = types.MethodType(_OneLineParser.error, s)
    s.parse_known_args = types.MethodType(_OneLineParser.parse_known_args, s)
    s.add_argument("--models", type=_models, default=None,
                   help="comma-separated model names, loaded at start (default: every published model, each "
                        "loaded at its first request)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=argtypes.port, default=8000)
    s.add_argument("--device", "-d", default="cpu", type=argtypes.device, help="cpu, cuda or cuda:N")
    s.add_argument("--budget", type=argtypes.size, default=None,
                   help="bytes of weights resident at once (e.g. 2GiB); least recently used models are unloaded")
    s.add_argument("--max-batch-size", type=argtypes.positive(int), default=32,
                   help="rows per forward (dynamic batching)")
    s.add_argument("--max-queue-delay-ms", type=argtypes.non_negative, default=0.0,
                   help="longest a request waits for others to batch with (0, Triton's default: batches "
                        "form from requests that arrive while the previous forward runs)")
    s.add_argument("--queue-limit", type=argtypes.positive(int), default=256,
                   help="requests queued per model before answering 503")
    s.add_argument("--compile", action="store_true",
                   help="serve each version as an AOTInductor package from the compile cache (compiled on a miss)")
    s.add_argument("--compile-mode", type=argtypes.compile_mode, default="default",
                   help="torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs")
    s.add_argument("--poll-s", type=argtypes.positive(float), default=2.0,
                   help="seconds between checks for a newly promoted version (hot swap)")
    s.add_argument("--no-shm", action="store_true", help="ignore the /dev/shm tier")
    s.add_argument("--max-body", type=argtypes.size, default=None, help="largest request body (default 64MiB)")
    s.add_argument("--drain-timeout-s", type=argtypes.positive(float), default=30.0,
                   help="on SIGTERM, how long in-flight requests may take to finish")
    s.add_argument("--sample-rate", type=argtypes.rate, default=None,
                   help="share of inference rows written back as unlabeled batches under incoming/serving-*/ "
                        "for ingestion and drift checks (0..1; default FORGELINE_SERVE_SAMPLE_RATE, else 0: off)")
    s.add_argument("--sample-window-s", type=argtypes.positive(float), default=None,
                   help="a traffic window closes (and lands, _READY last) this many seconds after its first sample "
                        "(default FORGELINE_SERVE_SAMPLE_WINDOW_S, else 300)")
    s.add_argument("--sample-window-samples", type=argtypes.positive(int), default=None,
                   help="...or when it holds this many samples (default FORGELINE_SERVE_SAMPLE_WINDOW_SAMPLES, else 10000)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(fn=cmd_serve)

    ssub = s.add_subparsers(dest="serve_cmd", parser_class=_OneLineParser)
    st = ssub.add_parser("status", help="per-model latency, requests, queue wait, memory, loads/swaps of a server")
    st.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--timeout-s", type=argtypes.positive(float), default=5.0)
    st.set_defaults(fn=cmd_status)
    return s


# ---------------------------------------------------------------------------------------------
# forgeline serve
# ---------------------------------------------------------------------------------------------


def build_registry(args):
    """The serving core over the environment's storage (and shm tier / compile cache)."""
    from pipeline import settings
    from pipeline.serving.registry import ModelRegistry, ServeConfig

    def flag(name, default):  # flags win over the environment (getattr: callers may build args by hand)
        value = getattr(args, name, None)
        return default() if value is None else value

    config = ServeConfig(models=args.models, device=args.device, budget_bytes=args.budget,
                         max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                         queue_limit=args.queue_limit, poll_s=args.poll_s, compile=args.compile,
                         compile_mode=args.compile_mode,
                         sample_rate=flag("sample_rate", settings.serve_sample_rate),
                         sample_window_s=flag("sample_window_s", settings.serve_sample_window_s),
                         sample_window_samples=flag("sample_window_samples", settings.serve_sample_window_samples))
    # The store and the tier straight from the engine's settings: a serving process does not need
    # Dagster (importing it costs seconds of cold start); credentials come from boto3's chain.
    from pipeline.shm_tier import reader_tier
    from pipeline.storage import configured

    store = configured()
    tier = None if args.no_shm else reader_tier(settings.shm_root(), capacity_bytes=settings.shm_capacity_bytes(),
                                                warn=lambda m: print(f"forgeline serve: {m}", file=sys.stderr))
    cache = None
    if args.compile:
        from pipeline.compile_cache import configured as configured_cache

        cache = configured_cache(store)
    return ModelRegistry(store, config, tier=tier, cache=cache), store


def cmd_serve(args) -> int:
    from pipeline.serving.app import serve
    from pipeline.serving.protocol import DEFAULT_MAX_BODY_BYTES

    # forgeline's own loggers at --log-level (loads, swaps, evictions, drain); libraries stay at
    # WARNING. Lines are written by a logging thread: a write to stderr from the event loop gives
    # the GIL away and waits to get it back, two lines per swap-in.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lines: queue.SimpleQueue = queue.SimpleQueue()
    writer = logging.handlers.QueueListener(lines, handler)
    ours = logging.getLogger("forgeline")
    ours.addHandler(logging.handlers.QueueHandler(lines))
    ours.setLevel(args.log_level.upper())
    ours.propagate = False
    writer.start()
    try:
        try:
            from jobs.runs import check_port

            check_port(args.host, args.port, "model server")
            argtypes.check_device(args.device)
            registry, store = build_registry(args)
        except Exception as e:  # noqa: BLE001 - bad settings, unreachable storage: one line
            print(f"forgeline serve: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
            return 1
        what = ",".join(args.models) if args.models else "every published model"
        print(f"forgeline serve: {what} from {store.uri()} on {args.device}; http://{args.host}:{args.port}/v2 "
              f"(metrics: /metrics; SIGTERM drains)", file=sys.stderr, flush=True)
        rc = serve(registry, args.host, args.port, max_body_bytes=args.max_body or DEFAULT_MAX_BODY_BYTES,
                   drain_timeout_s=args.drain_timeout_s, log_level=args.log_level,
                   access_log=args.log_level == "debug")  # one line per request only when debugging
    finally:
        writer.stop()  # every queued line is written first
    _exit_past_stuck_threads(rc)
    return rc


def _exit_past_stuck_threads(rc: int, grace_s: float = 5.0) -> None:
    """After the drain, a thread still in a read that never returns (a hung NFS mount, a stalled
    device) would hold the interpreter's exit forever (worker threads are joined at exit), and no
    signal ends it. A watchdog gives the normal exit ``grace_s``; past that it names the threads
    still alive and ends the process."""

    def watchdog() -> None:
        time.sleep(grace_s)
        stuck = sorted(t.name for t in threading.enumerate()
                       if t.is_alive() and not t.daemon and t is not threading.main_thread())
        print(f"forgeline serve: exiting while {len(stuck)} thread(s) are still blocked ({', '.join(stuck)}), "
              "e.g. in a storage read that does not return", file=sys.stderr, flush=True)
        os._exit(rc)

    threading.Thread(target=watchdog, name="forgeline-exit-watchdog", daemon=True).start()


# ---------------------------------------------------------------------------------------------
# forgeline serve status
# ---------------------------------------------------------------------------------------------


def _ms(v) -> str:
    return "—" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")


def _counts(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items()) or "0"


def cmd_status(args) -> int:
    url = args.url.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=args.timeout_s) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"forgeline serve status: cannot read {url}/metrics: {reason}", file=sys.stderr)
        return 1
    from pipeline.metrics import human_bytes, served_summary

    try:
        summary = served_summary(text)
    except Exception as e:  # noqa: BLE001 - not a Prometheus exposition
        print(f"forgeline serve status: {url}/metrics is not Prometheus text: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"url": url, "models": summary}))
        return 0
    from rich.table import Table

    from jobs.runs import make_console

    console = make_console()
    if not summary:
        console.print(f"{url}: no model has been loaded or asked for yet")
        return 0
    table = Table(title=f"forgeline serve status ({url})")
    for col in ("model", "serving (previous)", "alias read", "requests", "latency P50/P95/P99 ms",
                "queue wait P50/P99 ms", "queued", "resident", "loads", "swaps", "evictions"):
        table.add_column(col, overflow="fold")
    now = time.time()
    for model, e in summary.items():
        serving = (e["serving"] or "—") + (f" ({e['previous']})" if e["previous"] else "")
        read = "—" if e["alias_read_at"] is None else f"{max(0.0, now - e['alias_read_at']):.0f}s ago"
        if e["alias_reads_failed"]:
            read += f", {e['alias_reads_failed']} failed"
        table.add_row(model, serving, read, _counts(e["requests_by_result"]),
                      f"{_ms(e['p50_ms'])} / {_ms(e['p95_ms'])} / {_ms(e['p99_ms'])}",
                      f"{_ms(e['queue_wait_p50_ms'])} / {_ms(e['queue_wait_p99_ms'])}", str(e["queue_depth"]),
                      human_bytes(e["resident_bytes"]), _counts(e["loads"]), _counts(e["swaps"]), _counts(e["evictions_by_reason"]))
    console.print(table)
    console.print("latency percentiles are estimated from the histogram buckets (as Prometheus does)")
    return 0
