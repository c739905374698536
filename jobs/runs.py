"""Running jobs on the embedded Dagster instance, for the CLI and the demo: the instance's home and
its dagster.yaml, run-config validation, launching a run in-process with a live step view, Ctrl-C
cancellation, stale-run reaping, and the one line a failed run leaves (its root cause)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline import settings
from pipeline.storage import StorageError, make_dir, write_file_atomic


def make_console(**kw) -> Console:
    """A rich Console for a command's output: the terminal's width, or 200 columns when piped (a log,
    ``| tee``), where rich would otherwise fold every table to 80 columns and cut its cells short."""
    console = Console(**kw)
    return console if console.is_terminal else Console(width=200, **kw)


console = make_console(log_path=False)  # step lines name the step, not the line of runs.py that printed them
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class UserError(Exception):
    """A mistake the user can fix (unknown job, bad config, ...): one line, no traceback."""


class RunCanceled(Exception):
    """The run was canceled from this CLI (Ctrl-C, SIGTERM)."""


def check_port(host: str, port: int, what: str) -> None:
    """:class:`UserError` unless this host can listen on ``host:port`` now: a server whose port is
    taken should say so in one line before it starts (``dagster dev`` keeps running without its UI;
    a model server would set up its registry first). ``what``: the server, for the message."""
    import errno

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host}: not an address of this machine ({e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT does not count
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"{host}:{port} is already in use (another {what}?): "
                                "choose another with --port") from None
            raise UserError(f"{what} cannot listen on {host}:{port}: {e.strerror or e}") from None


# Run monitoring (needs the daemon: `make ui` / `dagster dev` / `dagster-daemon run`): a run stuck
# starting, or a canceling run whose process is gone, is failed / marked canceled; slots still
# held by a run that ended are freed; a run past max_runtime_seconds (e.g. its run worker was
# SIGKILLed or its machine lost: the default run launcher cannot health-check its workers) is
# failed. Runs executed in-process by `forgeline launch` are also checked by the CLI itself before
# each launch (a run STARTED whose process is gone is failed and its slots freed).
_RUN_MONITORING_YAML = """\
# Stale runs (a run worker killed hard, a lost machine) must not hold pool slots forever.
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  max_runtime_seconds: 43200
  poll_interval_seconds: 30
  free_slots_after_run_end_seconds: 30
"""

_DAGSTER_YAML = """\
# Embedded defaults: SQLite run/event/schedule storage under this folder.
telemetry:
  enabled: false
# GPU steps (assets with pool="gpu") run one at a time per instance unless raised here.
concurrency:
  pools:
    default_limit: 1
""" + _RUN_MONITORING_YAML


def instance_home() -> Path:
    """The Dagster instance's folder: ``DAGSTER_HOME``, else ``$FORGELINE_HOME/dagster_home``."""
    return Path(os.environ.get("DAGSTER_HOME") or settings.home() / "dagster_home")


def ensure_instance_home() -> Path:
    """Point DAGSTER_HOME at the project-local instance unless the user chose one; write its
    dagster.yaml if missing, and add run monitoring to an existing one that lacks it."""
    what = "DAGSTER_HOME" if os.environ.get("DAGSTER_HOME") else "the Dagster instance folder (in FORGELINE_HOME)"
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(instance_home())))
    if not home.is_absolute():  # Dagster refuses it too, but only after this wrote a dagster.yaml there
        raise UserError(f"DAGSTER_HOME: {str(home)!r} is a relative path: give an absolute one "
                        f"(e.g. {home.absolute()})")
    make_dir(home, what)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        write_file_atomic(cfg, _DAGSTER_YAML)  # whole or absent: a full disk leaves no empty instance file
    else:
        _add_run_monitoring(cfg)
    return home


def _add_run_monitoring(cfg: Path) -> None:
    """An instance made before run monitoring was shipped: append the block (the user's other
    settings and comments stay as they are) and say so in one line; if the file cannot be
    written, say how to add it."""
    import yaml

    text = cfg.read_text()
    if not text.strip():  # empty (as an interrupted write by an older forgeline left it): the defaults
        write_file_atomic(cfg, _DAGSTER_YAML)
        err_console.print(f"forgeline: {cfg} was empty: wrote the embedded defaults")
        return
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{cfg} is not valid YAML ({first_line(e)}): fix it or remove it to get the defaults") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{cfg} must be a YAML mapping of instance settings: fix it or remove it to get the defaults")
    if data and "run_monitoring" in data:
        return
    try:  # rewritten whole: a failed append would leave half a block (invalid YAML)
        write_file_atomic(cfg, text + ("" if text.endswith("\n") else "\n") + _RUN_MONITORING_YAML)
    except StorageError:
        err_console.print(f"forgeline: {cfg} has no run_monitoring: add `run_monitoring: {{enabled: true, "
                          "max_runtime_seconds: 43200}}` so a killed run cannot hold pool slots forever")
        return
    err_console.print(f"forgeline: added run_monitoring to {cfg} (stale runs are failed and their pool slots freed)")


def first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def load_defs():
    from jobs.definitions import build_defs

    return build_defs()  # read the environment now, not at import


# ---------------------------------------------------------------------------------------------
# Running a job with a live view of its steps
# ---------------------------------------------------------------------------------------------

# Who executes a run this CLI launched: stale-run detection compares them with the living processes.
TAG_PID = "forgeline/launcher_pid"
TAG_HOST = "forgeline/launcher_host"
TAG_STARTED = "forgeline/launcher_started"  # the process's start time: a reused pid is not the same process


def _process_tags() -> dict:
    import psutil

    return {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname(),
            TAG_STARTED: f"{psutil.Process().create_time():.2f}"}


def _launcher_alive(tags) -> bool | None:
    """Whether the process that executes a run is alive; None when this host cannot tell (a run
    launched by the daemon, the UI, or on another machine)."""
    import psutil

    if tags.get(TAG_HOST) != socket.gethostname() or TAG_PID not in tags:
        return None
    try:
        proc = psutil.Process(int(tags[TAG_PID]))
        started = proc.create_time()
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return True
    try:
        return abs(started - float(tags.get(TAG_STARTED, started))) < 1.0
    except ValueError:
        return True


def reap_stale_runs(instance) -> list[str]:
    """Fail the runs a process of this CLI on this host executed and that are still in progress
    although the process is gone (SIGKILL, OOM kill, a crash), and free the pool slots they, or any
    run that already ended, still hold. Returns one line per run fixed."""
    import dagster as dg

    notes = []
    in_progress = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
                   dg.DagsterRunStatus.CANCELING]
    storage = instance.event_log_storage
    for rec in instance.get_run_records(filters=dg.RunsFilter(statuses=in_progress,
                                                               tags={TAG_HOST: socket.gethostname()})):
        run = rec.dagster_run
        if _launcher_alive(run.tags) is not False:
            continue
        why = (f"the process that executed it (pid {run.tags.get(TAG_PID)}) is gone (killed or crashed); "
               "marked by forgeline before the next launch")
        if run.status == dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, message=f"Canceled: {why}")
            verdict = "canceled"
        else:
            instance.report_run_failed(run, message=f"Failed: {why}")
            verdict = "failed"
        storage.free_concurrency_slots_for_run(run.run_id)
        notes.append(f"run {run.run_id[:8]} ({_run_label(run)}) was {run.status.value} but its process is gone: "
                     f"marked {verdict}, its pool slots freed")
    if storage.supports_global_concurrency_limits:
        ended = set()
        for key in storage.get_concurrency_keys():
            for slot in storage.get_concurrency_info(key).claimed_slots:
                run = instance.get_run_by_id(slot.run_id)
                if slot.run_id not in ended and (run is None or run.is_finished):
                    ended.add(slot.run_id)
                    storage.free_concurrency_slots_for_run(slot.run_id)
                    notes.append(f"freed the {key!r} pool slot still held by run {slot.run_id[:8]}, which "
                                 + ("no longer exists" if run is None else f"ended {run.status.value}"))
    return notes


def _run_label(run) -> str:
    part = run.tags.get("dagster/partition")
    return run.job_name + (f" [{part}]" if part else "")


def _resolve_job(defs, job_name: str):
    names = sorted(j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__"))
    if job_name not in names:
        raise UserError(f"unknown job {job_name!r}; jobs: {', '.join(names)} (see `forgeline jobs`)")
    return defs.resolve_job_def(job_name)


def validate_run_config(job, run_config: dict) -> dict:
    """Check ``run_config`` against the job's schema and every step's ``dg.Config`` class (types,
    enumerations, ranges) before anything runs; a mistake raises :class:`UserError` naming the
    step and the field. Returns the config Dagster resolved (defaults filled in)."""
    import dagster as dg
    from pydantic import ValidationError

    try:
        resolved = dg.validate_run_config(job, run_config)
    except dg.DagsterInvalidConfigError as e:
        msgs = [err.message.replace("root:ops:", "").replace(":config:", ".") for err in e.errors]
        raise UserError("invalid run config: " + "; ".join(" ".join(m.split()) for m in msgs)) from None
    for name, node_cfg in (resolved.get("ops") or {}).items():
        node = job.graph.node_dict.get(name)
        compute_fn = getattr(getattr(node, "definition", None), "compute_fn", None)
        has_config = getattr(compute_fn, "has_config_arg", None)
        if compute_fn is None or has_config is None or not has_config():
            continue
        cls = compute_fn.get_config_arg().annotation
        if not (isinstance(cls, type) and issubclass(cls, dg.Config)):
            continue
        values = (node_cfg or {}).get("config") or {}
        try:
            cls(**cls._get_non_default_public_field_values_cls(values))  # as Dagster builds it for the step
        except ValidationError as e:
            msgs = [f"{name}.{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')} "
                    f"(got {err.get('input')!r})"
                    for err in e.errors()]
            raise UserError("invalid run config: " + "; ".join(msgs)) from None
    return resolved


def root_cause(error) -> str:
    """The user's exception inside Dagster's wrappers: the first error of the ``cause`` chain that
    is not Dagster's own (e.g. the IngestError naming the file and column), as ``Type: message``."""
    chain, e = [], error
    while e is not None:
        chain.append(e)
        e = e.cause
    ours = [e for e in chain if not (e.cls_name or "").startswith("Dagster")]
    pick = ours[0] if ours else chain[-1]
    msg = (pick.message or "").strip()
    if pick.cls_name:  # "pkg.mod.IngestError: text" -> "IngestError: text"
        head, sep, rest = msg.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == pick.cls_name:
            msg = rest
        msg = f"{pick.cls_name}: {msg}"
    return msg


def check_outcome(evaluation) -> str:
    """What an asset check evaluation found, in a few words: its description, else its scalar
    metadata (``test_accuracy=0.12, min_accuracy=0.9``)."""
    if evaluation.description:
        return " ".join(evaluation.description.split())
    values = {k: v.value for k, v in evaluation.metadata.items()}
    said = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
                     if isinstance(v, (int, float, str)) and len(str(v)) <= 80)
    return said or "see `make ui` for its metadata"


def failure_cause(instance, run_id: str) -> tuple[str, list[str]]:
    """Why a run failed, in one line: the first failed step's root cause, else the run's; and the
    gates that stopped it, if that is why: the blocking checks (``"asset:check failed (what it
    found)"``) whose failure failed their step, else ``[]``."""
    first = None
    blocking: dict[str, list[str]] = {}  # step -> its failed checks of ERROR severity
    for rec in instance.all_logs(run_id):
        ev = rec.dagster_event
        if ev is not None and ev.event_type_value == "ASSET_CHECK_EVALUATION":
            d = ev.event_specific_data
            if not d.passed and d.severity.value == "ERROR":
                blocking.setdefault(ev.step_key, []).append(
                    f"{d.asset_key.to_user_string()}:{d.check_name} failed ({check_outcome(d)})")
            continue
        err = getattr(ev.event_specific_data, "error", None) if ev is not None else None
        if err is None:
            continue
        where = f"step {ev.step_key}" if ev.step_key else "run"
        line = f"{where}: {first_line(root_cause(err))}"
        if ev.event_type_value == "STEP_FAILURE":
            if blocking.get(ev.step_key) and "DagsterAssetCheckFailedError" in line:
                return f"{where}: blocking check " + "; ".join(blocking[ev.step_key]), blocking[ev.step_key]
            return line, []
        first = first or line
    return first or "see `make ui` for its event log", []


def run_failure(instance, run_id: str) -> str:
    """One line saying why a run failed (:func:`failure_cause`): a step stopped by a blocking asset
    check names the check and what it found."""
    return failure_cause(instance, run_id)[0]


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a `kill`, a CI timeout) stops a launch the way Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _raise_in_thread(thread: threading.Thread, exc: type[BaseException]) -> None:
    import ctypes

    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))


def _stop_children(grace_s: float = 5.0) -> None:
    """Stop every process this one started and left running (a run's torchrun and its ranks):
    SIGTERM, then SIGKILL after ``grace_s``."""
    import psutil

    kids = psutil.Process().children(recursive=True)
    for p in kids:
        with suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(kids, timeout=grace_s)
    for p in alive:
        with suppress(psutil.Error):
            p.kill()


def cancel_run(instance, run_id: str, thread: threading.Thread, *, grace_s: float = 60.0) -> None:
    """Cancel a run executing in ``thread``: mark it CANCELING, interrupt its step (the training
    launcher then stops torchrun's process group), wait for Dagster to record CANCELED, and free
    its pool slots. A run that does not stop within ``grace_s`` is marked CANCELED anyway."""
    from dagster._core.errors import DagsterExecutionInterruptedError

    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        instance.report_run_canceling(run, message="Canceling: interrupted in `forgeline launch` (Ctrl-C / SIGTERM)")
    deadline = time.monotonic() + grace_s
    try:
        _raise_in_thread(thread, DagsterExecutionInterruptedError)
        thread.join(min(10.0, grace_s))
        if thread.is_alive():  # it was in native code, or the exception landed where it was swallowed
            _stop_children()  # what it waits on (torchrun's ranks) goes, so the wait ends
            _raise_in_thread(thread, DagsterExecutionInterruptedError)
            thread.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
        pass
    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        instance.report_run_canceled(run, message="Canceled from `forgeline launch` (the run did not stop in time)")
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def _pool_holders(instance, pool: str, run_id: str) -> str:
    try:
        info = instance.event_log_storage.get_concurrency_info(pool)
    except Exception:  # noqa: BLE001 - the view must not fail the run
        return ""
    holders = []
    for slot in info.claimed_slots:
        if slot.run_id == run_id:
            continue
        run = instance.get_run_by_id(slot.run_id)
        who = f"run {slot.run_id[:8]}"
        if run is not None:
            pid = run.tags.get(TAG_PID)
            who += f" ({_run_label(run)}, {run.status.value}" + (f", pid {pid}" if pid else "") + ")"
        holders.append(f"{who} step {slot.step_key}")
    limit = f" (limit {info.limit})" if info.limit is not None else ""
    return f"{limit}, held by " + "; ".join(holders) if holders else limit


def run_job(job_name: str, *, partition: str | None = None, run_config: dict | None = None, quiet: bool = False,
            tags: dict | None = None):
    """Execute ``job_name`` on the embedded instance, showing step progress. Returns the result.

    The run config is validated first (nothing runs on a mistake). Runs an earlier process of
    this CLI left in progress when it was killed are failed and their pool slots freed. A
    partition that does not exist yet is added first (dynamic partitions), so ``forgeline launch
    ingest --partition new-batch`` is all a user needs. Ctrl-C
    or SIGTERM cancels the run (:class:`RunCanceled`).
    """
    import dagster as dg

    ensure_instance_home()
    defs = load_defs()
    job = _resolve_job(defs, job_name)
    instance = dg.DagsterInstance.get()
    if partition is not None and job.partitions_def is None:
        raise UserError(f"job {job_name!r} is not partitioned; drop --partition")
    if partition is None and job.partitions_def is not None:
        raise UserError(f"job {job_name!r} is partitioned: pass --partition (see `forgeline batches`)")
    # The progress view replaces Dagster's console log (failures included: the view prints their
    # root cause); the UI keeps the full event log.
    run_config = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}, **(run_config or {})}
    validate_run_config(job, run_config)
    for note in reap_stale_runs(instance):
        err_console.print(f"forgeline: {note}")
    if partition is not None:
        pdef = job.partitions_def
        if isinstance(pdef, dg.DynamicPartitionsDefinition):
            if not instance.has_dynamic_partition(pdef.name, partition):
                if pdef.name == "batches":  # only a valid name of a batch that has landed completely
                    from jobs.withdraw_cli import check_new_partition
                    from resources.storage import open_storage

                    # outside a run: the resource's EnvVar credentials are resolved as a run would
                    check_new_partition(open_storage(defs.resources["storage"]), partition)
                instance.add_dynamic_partitions(pdef.name, [partition])
        elif partition not in pdef.get_partition_keys(dynamic_partitions_store=instance):
            raise UserError(f"unknown partition {partition!r} of job {job_name!r}")

    steps = sorted(job.graph.node_names())
    run_id = str(uuid.uuid4())
    box: dict = {}

    def target():
        try:
            box["result"] = job.execute_in_process(
                run_config=run_config, instance=instance, partition_key=partition, run_id=run_id, raise_on_error=False,
                tags={**(tags or {}), **_process_tags()},
            )
        except BaseException as e:  # surfaced below
            box["error"] = e

    t = threading.Thread(target=target, name=f"forgeline-run-{run_id[:8]}", daemon=True)
    t0 = time.perf_counter()
    with _terminate_as_interrupt():
        try:
            t.start()
            _watch(instance, job_name, partition, run_id, steps, t, quiet)
        except KeyboardInterrupt:
            cancel_run(instance, run_id, t)
            raise RunCanceled(run_id) from None
    if "error" in box:
        raise box["error"]
    result = box["result"]
    secs = time.perf_counter() - t0
    status = "[green]SUCCESS" if result.success else "[red]FAILURE"
    if not quiet:
        console.print(f"{status}[/] run {run_id} ({secs:.1f}s) — view it with `make ui`")
    return result


def _watch(instance, job_name, partition, run_id, steps, t, quiet) -> None:
    state = {s: "waiting" for s in steps}
    blocked: dict[str, str] = {}
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as progress:
        task = progress.add_task(f"{job_name}" + (f" [{partition}]" if partition else ""), total=len(steps))
        cursor = 0
        while True:
            alive = t.is_alive()
            records = instance.all_logs(run_id)
            for rec in records[cursor:]:
                ev = rec.dagster_event
                if ev is None or ev.step_key is None:
                    continue
                step = ev.step_key
                kind = ev.event_type_value
                if kind == "STEP_START":
                    state[step] = "running"
                    blocked.pop(step, None)
                    progress.console.log(f"[cyan]▶ {step}")
                elif kind == "STEP_SUCCESS":
                    state[step] = "ok"
                    progress.console.log(f"[green]✔ {step}[/] ({ev.event_specific_data.duration_ms / 1000:.2f}s)")
                elif kind == "STEP_FAILURE":
                    state[step] = "failed"
                    err = ev.event_specific_data.error
                    progress.console.log(f"[red]✘ {step}: {escape(root_cause(err)) if err else 'failed'}", highlight=False)
                elif kind == "ENGINE_EVENT" and "pool" in (getattr(ev.event_specific_data, "metadata", None) or {}):
                    pool = ev.event_specific_data.metadata["pool"].value
                    held = _pool_holders(instance, pool, run_id)
                    if blocked.get(step) != held:  # say it once, and again when the holder changes
                        blocked[step] = held
                        progress.console.log(f"[yellow]⏸ {step} is waiting for pool {pool!r}{escape(held)}", highlight=False)
                elif kind == "ASSET_CHECK_EVALUATION":
                    d = ev.event_specific_data
                    mark = ("[green]pass" if d.passed
                            else f"[yellow]{d.severity.value.lower()}[/]: {escape(check_outcome(d))}")
                    progress.console.log(f"  check {d.asset_key.to_user_string()}:{d.check_name} {mark}",
                                         highlight=False)
            cursor = len(records)
            progress.update(task, completed=sum(v in ("ok", "failed") for v in state.values()))
            if not alive:
                break
            time.sleep(0.2)


def materialization_table(result) -> Table:
    """What a run produced and where: one row per materialized asset."""
    table = Table(title="Produced")
    for col in ("asset", "partition", "where", "highlights"):
        table.add_column(col, overflow="fold")
    for ev in result.get_asset_materialization_events():
        import dagster as dg

        mat = ev.event_specific_data.materialization
        paths = [v.value for v in mat.metadata.values() if isinstance(v, dg.PathMetadataValue)]
        where = paths[0] if paths else ""
        md = {k: v.value for k, v in mat.metadata.items()}
        highlights = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in md.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        table.add_row(mat.asset_key.to_user_string(), mat.partition or "", str(where), highlights)
    return table


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def report_failure(result) -> int:
    """The one line a failed run leaves on stderr: its root cause. Returns the exit status."""
    import dagster as dg

    err_console.print(f"forgeline: run {result.run_id[:8]} failed: "
                      f"{run_failure(dg.DagsterInstance.get(), result.run_id)}", markup=False)
    return 1


def open_store():
    """The model store outside a run (:func:`pipeline.storage.configured`)."""
    from pipeline.storage import configured

    return configured()


