"""``forgeline models``, ``forgeline promote``, ``forgeline rollback``: the published versions of a
model and which one is in production (:mod:`pipeline.promotion`).

    forgeline models [MODEL] [--json]                  versions: production, previous, rejected,
                                                       incomplete, gates, created, run id
    forgeline promote MODEL VERSION [--reason TEXT]    make VERSION production (gates must have passed)
    forgeline rollback MODEL [--reason TEXT]           production back to the version before it

Every check is the engine's: :func:`pipeline.export.version_problem` (complete, not rejected) and
:func:`pipeline.promotion.promote` (refuses incomplete, rejected or gate-failed versions). A refusal
or any other user error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys

from rich.markup import escape
from rich.table import Table

from jobs.runs import make_console, open_store
from pipeline import export, promotion
from pipeline.storage import CorruptObject, StorageError


class _Refused(Exception):
    """One line for the user (exit 1)."""


def _fail(e: BaseException | str) -> int:
    print(f"forgeline: {' '.join(str(e).split())}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------------
# forgeline models
# ---------------------------------------------------------------------------------------------


def model_names(store) -> list[str]:
    """Models with at least one manifest or a production alias under ``models/``."""
    root = export.DEFAULT_ROOT
    names = set()
    for obj in store.list(root):
        parts = obj.key[len(root) + 1:].split("/")
        if (len(parts) == 3 and parts[2] == export.MANIFEST_NAME) or (len(parts) == 2 and parts[1] == promotion.ALIAS):
            names.add(parts[0])
    return sorted(names)


def model_versions(store, model: str) -> dict:
    """``{"model", "production": alias record or None, "latest", "versions": [...]}``, versions
    oldest first (by the manifests' ``created``). Each version: ``status`` (a list: production,
    previous, latest, rejected, incomplete), ``rejected`` (the manifest's record) / ``problem``
    (why it is incomplete), ``gates`` (the manifest's, plus those its latest promotion recorded),
    ``created``, ``run_id``, ``data_version``, ``bytes``, ``promoted_at``."""
    alias = promotion.production(store, model)
    promoted: dict[str, dict] = {}
    evidence: dict[str, dict] = {}  # every gate any promotion of the version recorded (a rollback records none)
    for rec in promotion.history(store, model):
        promoted[rec["version"]] = rec  # oldest first: the latest promotion of each version wins
        evidence.setdefault(rec["version"], {}).update(rec.get("gates") or {})
    latest = export.latest_version(store, model)
    rows = []
    for v in export.list_versions(store, model):
        try:
            manifest = export.read_manifest(store, model, v)
        except (export.ExportError, CorruptObject) as e:  # this version is unusable; the rest are listed
            manifest = {}
            problem = str(e)
        else:
            problem = export.version_problem(store, model, v, allow_rejected=True)
        rejected = manifest.get("rejected")
        status = []
        if alias and alias.get("version") == v:
            status.append("production")
        if alias and alias.get("previous") == v:
            status.append("previous")
        if latest == v:
            status.append("latest")
        if rejected:
            status.append("rejected")
        if problem:
            status.append("incomplete")
        rec = promoted.get(v)
        rows.append({
            "version": v, "status": status,
            "rejected": rejected if isinstance(rejected, dict) else ({"reason": str(rejected)} if rejected else None),
            "problem": problem,
            "gates": {**evidence.get(v, {}), **(manifest.get("gates") or {})},
            "created": manifest.get("created"), "run_id": manifest.get("run_id"),
            "data_version": manifest.get("data_version"), "bytes": manifest.get("bytes"),
            "promoted_at": (rec or {}).get("promoted_at"),
        })
    if alias and alias.get("version") not in {r["version"] for r in rows}:  # its folder is gone: say so
        gone = alias.get("version")
        rows.append({"version": gone, "status": ["production", "incomplete"], "rejected": None,
                     "problem": export.version_problem(store, model, gone) or "not published",
                     "gates": dict(alias.get("gates") or {}), "created": None, "run_id": alias.get("run_id"),
                     "data_version": None, "bytes": None, "promoted_at": alias.get("promoted_at")})
    rows.sort(key=lambda r: (r["created"] or "", r["version"]))
    if not rows and alias is None:
        raise _Refused(f"no published version of {model!r} in {store.uri(export.DEFAULT_ROOT)}")
    return {"model": model, "production": alias, "latest": latest, "versions": rows}


def _gates_text(gates: dict) -> str:
    out = []
    for name, g in sorted(gates.items()):
        g = g or {}
        mark = "[green]pass[/]" if g.get("passed") else "[red]FAIL[/]"
        value = f" {g['value']:.4g}" if isinstance(g.get("value"), (int, float)) else ""
        limit = f" (limit {g['limit']:.4g})" if isinstance(g.get("limit"), (int, float)) else ""
        out.append(f"{escape(name)} {mark}{value}{limit}")
    return "\n".join(out) or "—"


_STYLE = {"production": "bold green", "previous": "cyan", "latest": "blue", "rejected": "red", "incomplete": "yellow"}


def _status_text(row: dict) -> str:
    parts = []
    for s in row["status"]:
        text = s
        if s == "rejected" and row["rejected"]:
            text += f": {row['rejected'].get('reason') or ''}".rstrip(": ")
        if s == "incomplete" and row["problem"]:
            text += f": {row['problem']}"
        parts.append(f"[{_STYLE[s]}]{escape(text)}[/]")
    return "\n".join(parts) or "published"


def versions_table(info: dict) -> Table:
    alias = info["production"]
    caption = "nothing promoted yet"
    if alias:
        caption = (f"production {alias['version']} since {alias.get('promoted_at', '?')}"
                   + (f" (previous {alias['previous']})" if alias.get("previous") else "")
                   + (f": {alias['reason']}" if alias.get("reason") else ""))
    table = Table(title=f"{info['model']}: published versions", caption=escape(caption))
    for col in ("version", "status", "gates", "created", "run"):
        table.add_column(col, overflow="fold")
    for r in info["versions"]:
        run = (r["run_id"] or "")[:8] or "—"
        if r["data_version"]:
            run += f"\ndata {str(r['data_version'])[:12]}"
        table.add_row(escape(r["version"]), _status_text(r), _gates_text(r["gates"]),
                      escape((r["created"] or "—")[:19].replace("T", " ")), escape(run))
    return table


def cmd_models(args) -> int:
    try:
        store = open_store()
        if args.model is not None:
            export.version_prefix(args.model, "v")  # an invalid name ('', '../x') is named as such
        names = [args.model] if args.model is not None else model_names(store)
        if not names and args.json:  # for a script, no model is an empty list, not an error
            print(json.dumps({"models": []}))
            return 0
        if not names:
            raise _Refused(f"no published model in {store.uri(export.DEFAULT_ROOT)}")
        infos = [model_versions(store, m) for m in names]
    except (_Refused, export.ExportError, StorageError, ValueError) as e:
        return _fail(e)
    if args.json:
        print(json.dumps(infos[0] if args.model else {"models": infos}, indent=1, default=str))
        return 0
    console = make_console()
    for info in infos:
        console.print(versions_table(info))
    return 0


# ---------------------------------------------------------------------------------------------
# forgeline promote / rollback
# ---------------------------------------------------------------------------------------------


def cmd_promote(args) -> int:
    try:
        rec = promotion.promote(open_store(), args.model, args.version, reason=args.reason or "forgeline promote")
    except (export.ExportError, StorageError, ValueError) as e:  # PromotionError is an ExportError
        return _fail(e)
    make_console().print(f"promoted {escape(args.model)}/{escape(rec['version'])} to production"
                         + (f" (previous: {escape(rec['previous'])})" if rec.get("previous") else ""),
                         highlight=False)
    return 0


def cmd_rollback(args) -> int:
    try:
        store = open_store()
        was = promotion.production(store, args.model)
        rec = promotion.rollback(store, args.model, reason=args.reason or "forgeline rollback")
    except (export.ExportError, StorageError, ValueError) as e:
        return _fail(e)
    make_console().print(f"rolled back {escape(args.model)}: production is {escape(rec['version'])} again "
                         f"(was {escape(was['version'])})", highlight=False)
    return 0


def add_parser(sub) -> None:
    """Register ``models``, ``promote`` and ``rollback`` on the CLI's subparsers."""
    s = sub.add_parser("models", help="published versions of a model: production, previous, rejected, gates",
                       description="List the published versions of MODEL (every model when omitted) with their "
                                   "status (production, previous, latest, rejected with the reason, incomplete), "
                                   "gate results, creation time and the run that produced them.")
    s.add_argument("model", nargs="?", help="model name (default: every model)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("promote", help="make a published version production (only if its gates passed)",
                       description="Move the production alias models/MODEL/production to VERSION. Refused for a "
                                   "version that is not published, incomplete, rejected, or whose recorded gates "
                                   "failed.")
    s.add_argument("model")
    s.add_argument("version")
    s.add_argument("--reason", default="", help="why (kept in the promotion record)")
    s.set_defaults(fn=cmd_promote)

    s = sub.add_parser("rollback", help="production back to the version it replaced",
                       description="Promote the version production had before the current one (the alias's "
                                   "'previous'); refused when there is none or it can no longer be promoted.")
    s.add_argument("model")
    s.add_argument("--reason", default="", help="why (kept in the promotion record)")
    s.set_defaults(fn=cmd_rollback)


__all__ = ["add_parser", "model_names", "model_versions"]
