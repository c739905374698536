"""``forgeline withdraw`` and the batch checks of the CLI.

    forgeline withdraw BATCH --reason TEXT              take a published batch out of training
    forgeline withdraw BATCH --shard NAME --reason TEXT  or one of its shards
    forgeline batches                                    partitions, withdrawn ones marked

A withdrawal writes a record (who, when, why; ``pipeline.ingest.withdraw``) and the next training
run (``pipeline.dataset.collect``) leaves the batch or shard out; the published bytes stay.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from pipeline import ingest


def batch_name(text: str) -> str:
    """An argparse type: a valid batch name (:func:`pipeline.ingest.check_batch_name`)."""
    try:
        return ingest.check_batch_name(text)
    except ingest.BadBatchName as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def optional_batch_name(text: str) -> str:
    """:func:`batch_name`, or '' (meaning: none)."""
    return text if text == "" else batch_name(text)


def _store():
    from pipeline.storage import configured

    return configured()


def check_new_partition(store, partition: str) -> None:
    """Before a ``batches`` partition is added by hand (``forgeline launch --partition``): the name
    must be a batch name and the batch must have landed completely; else a one-line SystemExit."""
    try:
        ingest.require_ready(store, partition)
    except ingest.IngestError as e:
        raise SystemExit(f"--partition {partition!r}: {e}") from None


def cmd_withdraw(args) -> int:
    console = Console()
    try:
        rec = ingest.withdraw(_store(), args.batch, args.shard, reason=args.reason, by=args.by)
    except ingest.IngestError as e:
        console.print(f"[red]not withdrawn:[/] {e}")
        return 1
    what = f"shard {rec['shard']}" if rec["shard"] else f"batch {rec['batch']} ({len(rec['shards'])} shards)"
    samples = sum(s["samples"] for s in rec["shards"])
    console.print(f"withdrew {what}, {samples} samples, from training: {rec['reason']!r} "
                  f"(by {rec['by']} at {rec['time']}; record {rec['record']})")
    return 0


def show_batches(console: Console, keys: list[str]) -> None:
    """``forgeline batches``: one line per partition; with any withdrawal, a table that says which
    batches or shards are out of training, why, by whom and when."""
    recs = ingest.withdrawals(_store())
    if not recs:
        console.print("\n".join(keys) if keys else "no batches yet: `forgeline gen digits --batch NAME` then launch")
        return
    table = Table(title="batches")
    for col in ("batch", "training", "withdrawn (reason, by, when)"):
        table.add_column(col, overflow="fold")
    for b in sorted(set(keys) | {r["batch"] for r in recs}):
        mine = [r for r in recs if r["batch"] == b]
        whole = [r for r in mine if not r.get("shard")]
        notes = "\n".join(f"{r.get('shard') or 'whole batch'}: {r.get('reason')!r}, {r.get('by')}, {r.get('time')}"
                          for r in mine)
        state = "withdrawn" if whole else f"{len(mine)} shard(s) withdrawn" if mine else "in"
        table.add_row(b, state, notes)
    console.print(table)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``withdraw`` on the CLI's subparsers."""
    s = sub.add_parser("withdraw", help="take a published batch (or one shard) out of training, recorded",
                       description="Take a published batch, or one of its shards, out of training: a withdrawal "
                                   "record (who, when, why) is written and the next training run leaves it out; "
                                   "the published bytes stay.")
    s.add_argument("batch", type=batch_name)
    s.add_argument("--shard", help="one shard: its name in the batch (train-000003.tar, a/x.tar) or full key")
    s.add_argument("--reason", required=True, help="why (kept in the withdrawal record)")
    s.add_argument("--by", default=None, help="who withdraws it (default: user@host)")
    s.set_defaults(fn=cmd_withdraw)
    return s
