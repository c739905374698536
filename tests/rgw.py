"""A throwaway one-node Ceph cluster with its S3 gateway (RADOS Gateway) on 127.0.0.1.

The real S3 server under the tests and the benchmarks (moto's ranged GETs cost in proportion to
the object's size, so its figures say nothing about a real server). Debian's packages
``ceph-mon ceph-osd ceph-common radosgw`` (``make system-deps``) provide the daemons:

* one monitor (``paxos_propose_interval`` 0.1 s: pools are created in ~3 s instead of ~13 s),
* one OSD on the ``memstore`` object store (objects in RAM, ``memstore_bytes`` at most),
* radosgw with the ``beast`` frontend on a free loopback port, with ``tcp_nodelay=1``: without it
  every response under ~64 KiB (a manifest, an alias, a small part) waits ~40 ms for Nagle's
  algorithm and the client's delayed ACK (measured: 45 ms per 1-byte GET, 2.8 ms with it),
* every pool of size 1, no manager, no authentication inside the cluster (``auth_* = none``;
  radosgw then needs ``ms_mon_client_mode = crc`` or it hangs at start-up).

Everything lives in one directory (config, monitor store, logs, sockets) and is bound to
127.0.0.1; nothing is installed system-wide or left running: :meth:`RGWCluster.stop` ends the
daemons by PID, rgw then osd then mon. An S3 user with keys generated for this run is created.

Usage::

    with RGWCluster() as rgw:                     # ~3 s
        boto3.client("s3", endpoint_url=rgw.endpoint, **rgw.credentials)

    python -m tests.rgw                           # start one and wait; prints endpoint and keys
    python -m tests.rgw --env                     # ... as shell variables

A daemon that does not come up raises :class:`RGWError` with the tail of its log.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

PACKAGES = ("ceph-mon", "ceph-osd", "ceph-common", "radosgw")
PROGRAMS = ("ceph-mon", "ceph-osd", "ceph", "radosgw", "radosgw-admin", "monmaptool")
START_TIMEOUT_S = 60
LOG_TAIL_LINES = 40


class RGWError(RuntimeError):
    """The cluster could not be started (or a radosgw-admin command failed)."""


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


def install_hint() -> str:
    return (f"Ceph's RADOS Gateway is not installed (missing: {', '.join(missing_programs())}); "
            f"run `make system-deps` (apt-get install {' '.join(PACKAGES)})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:]) or f"(empty log {path})"


class RGWCluster:
    """A one-node Ceph cluster + radosgw in ``workdir`` (a fresh temporary directory by default,
    removed on :meth:`stop`). ``memstore_bytes`` bounds the bytes the OSD keeps in RAM: size it
    to what a benchmark stores at once (deleted data is freed by :meth:`gc`).

    After :meth:`start`: ``endpoint`` (http://127.0.0.1:<port>), ``credentials``
    (``aws_access_key_id`` / ``aws_secret_access_key``, made for this run), ``region`` and
    :meth:`env` (the same as AWS_* environment variables)."""

    region = "us-east-1"

    def __init__(self, workdir: str | os.PathLike | None = None, *, memstore_bytes: int = 2 << 30,
                 rgw_threads: int = 64, start_timeout: float = START_TIMEOUT_S, cpus: set[int] | None = None):
        self._own_dir = workdir is None
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="forgeline-rgw-"))
        self.memstore_bytes = memstore_bytes
        self.rgw_threads = rgw_threads
        self.start_timeout = start_timeout
        self.cpus = cpus  # the daemons run on these CPUs only (None: any)
        self.conf = self.dir / "ceph.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.endpoint = ""
        self.credentials: dict[str, str] = {}

    # Lifecycle ------------------------------------------------------------------------------
    def start(self) -> "RGWCluster":
        if missing_programs():
            raise RGWError(install_hint())
        t0 = time.monotonic()
        try:
            self._configure()
            self._start_mon()
            self._start_osd()
            self._start_rgw()
            self._create_user()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """End the daemons by PID in the order rgw, osd, mon (each SIGTERM, then SIGKILL after
        10 s); remove the working directory when it was made here."""
        for name in ("rgw", "osd", "mon"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RGWCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # Use ------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.credentials["aws_access_key_id"],
                "AWS_SECRET_ACCESS_KEY": self.credentials["aws_secret_access_key"],
                "AWS_DEFAULT_REGION": self.region, "FORGELINE_S3_ENDPOINT_URL": self.endpoint}

    def client(self, **config):
        """A boto3 S3 client for this gateway (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}, **config), **self.credentials)

    def admin(self, *args: str, timeout: float = 60) -> str:
        """``radosgw-admin <args>`` against this cluster; its stdout."""
        return self._run(["radosgw-admin", "-c", str(self.conf), "-n", "client.rgw", *args], timeout=timeout)

    def gc(self) -> None:
        """Free the RAM of deleted objects now (radosgw keeps deleted multipart data for its
        garbage collector for hours): run between benchmark rounds."""
        self.admin("gc", "process", "--include-all", timeout=300)

    # Steps ----------------------------------------------------------------------------------
    def _run(self, cmd: list[str], timeout: float = 60) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RGWError(f"`{' '.join(cmd)}` did not finish within {timeout:g} s"
                           f"{self._logs_of_running()}") from None
        if r.returncode != 0:
            raise RGWError(f"`{' '.join(cmd)}` failed (exit {r.returncode}):\n{(r.stderr or r.stdout).strip()[-3000:]}"
                           f"{self._logs_of_running()}")
        return r.stdout

    def _ceph(self, *args: str, timeout: float = 30) -> str:
        return self._run(["ceph", "-c", str(self.conf), "--connect-timeout", str(int(timeout)), *args],
                         timeout=timeout + 5)

    def _logs_of_running(self) -> str:
        out = []
        for name in self.procs:
            out.append(f"\n--- {name} log ({self._log(name)}), last lines ---\n{_tail(self._log(name))}")
        return "".join(out)

    def _log(self, name: str) -> Path:
        return self.dir / "log" / {"mon": "mon.a.log", "osd": "osd.0.log", "rgw": "client.rgw.log"}[name]

    def _configure(self) -> None:
        for sub in ("log", "run", "mon", "osd/osd.0", "crash"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.fsid = str(uuid.uuid4())
        self.mon_port, self.rgw_port = _free_port(), _free_port()
        d = self.dir
        self.conf.write_text(f"""\
[global]
fsid = {self.fsid}
mon_host = v2:127.0.0.1:{self.mon_port}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
log_to_stderr = false
err_to_stderr = false
crash_dir = {d}/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 1000

[mon]
mon_data = {d}/mon/$name
paxos_propose_interval = 0.1
mon_osd_reporter_subtree_level = osd
# The monitor's store is a few MB (objects live in the OSD's RAM): do not refuse to start, as
# a monitor does by default, because the disk holding it is 95% full.
mon_data_avail_crit = 1
mon_data_avail_warn = 2

[osd]
osd_data = {d}/osd/$name
osd_objectstore = memstore
memstore_device_bytes = {self.memstore_bytes}
osd_max_object_size = {1 << 30}

[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:{self.rgw_port} tcp_nodelay=1
rgw_thread_pool_size = {self.rgw_threads}
rgw_dns_name = 127.0.0.1
rgw_enable_usage_log = false
rgw_enable_ops_log = false
rgw_gc_obj_min_wait = 0
""")

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(self.dir / "log" / f"{name}.stdout", "wb")
        cpus = self.cpus
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # every thread inherits it
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=pin)
        out.close()
        self.procs[name] = proc
        return proc

    def _failed(self, name: str, why: str) -> RGWError:
        stdout = self.dir / "log" / f"{name}.stdout"
        extra = f"\n--- {stdout.name} ---\n{_tail(stdout, 10)}" if stdout.exists() and stdout.stat().st_size else ""
        return RGWError(f"{name} did not come up: {why}\n--- {self._log(name)}, last lines ---\n"
                        f"{_tail(self._log(name))}{extra}")

    def _wait(self, name: str, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        proc = self.procs[name]
        while True:
            if proc.poll() is not None:
                why = f"exited with status {proc.returncode}"
                if proc.returncode == errno.ENOSPC:  # Ceph's daemons exit with the errno
                    du = shutil.disk_usage(self.dir)
                    why += (f" (ENOSPC: no space left on the disk holding {self.dir}: "
                            f"{du.free / 1e9:.1f} GB free of {du.total / 1e9:.1f} GB)")
                raise self._failed(name, why)
            try:
                if ready():
                    return
            except RGWError:
                pass
            if time.monotonic() > deadline:
                raise self._failed(name, f"{what} not within {self.start_timeout:g} s")
            time.sleep(0.1)

    def _start_mon(self) -> None:
        monmap = self.dir / "monmap"
        self._run(["monmaptool", "--create", "--clobber", "--fsid", self.fsid,
                   "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", str(monmap)])
        self._run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap)])
        self._spawn("mon", ["ceph-mon", "-f", "-c", str(self.conf), "-i", "a"])
        self._wait("mon", lambda: bool(self._ceph("mon", "stat", timeout=5)), "quorum")

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        # The same uuid for `osd new` and `--mkfs`, or the OSD never boots.
        osd_id = self._ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise RGWError(f"`ceph osd new` gave id {osd_id!r}, expected 0")
        self._run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], timeout=60)
        self._spawn("osd", ["ceph-osd", "-f", "-c", str(self.conf), "-i", "0"])

        def up() -> bool:
            stat = json.loads(self._ceph("osd", "stat", "-f", "json", timeout=5))
            return stat.get("num_up_osds", stat.get("osdmap", {}).get("num_up_osds", 0)) >= 1

        self._wait("osd", up, "marked up by the monitor")

    def _start_rgw(self) -> None:
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        self._spawn("rgw", ["radosgw", "-f", "-c", str(self.conf), "-n", "client.rgw"])

        def answers() -> bool:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
            except urllib.error.HTTPError:
                return True  # an HTTP status is an answer
            except OSError:
                return False
            return True

        self._wait("rgw", answers, f"answering HTTP on {self.endpoint}")

    def _create_user(self) -> None:
        access, secret = secrets.token_hex(10).upper(), secrets.token_urlsafe(30)
        self.admin("user", "create", "--uid", "forgeline", "--display-name", "forgeline",
                   "--access-key", access, "--secret", secret)
        self.credentials = {"aws_access_key_id": access, "aws_secret_access_key": secret}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.rgw", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="working directory (default: a fresh temporary one, removed at exit)")
    p.add_argument("--memstore-gib", type=float, default=2.0, help="RAM the OSD may hold (GiB)")
    p.add_argument("--env", action="store_true", help="print shell variables instead of a summary")
    a = p.parse_args(argv)
    try:
        rgw = RGWCluster(a.dir, memstore_bytes=int(a.memstore_gib * (1 << 30))).start()
    except RGWError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if a.env:
            print("\n".join(f"export {k}={v}" for k, v in rgw.env().items()), flush=True)
        else:
            print(f"radosgw at {rgw.endpoint} (up in {rgw.started_in:.1f} s, files in {rgw.dir})\n"
                  + "\n".join(f"{k}={v}" for k, v in rgw.env().items()) + "\nCtrl-C stops it.", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(proc.poll() is None for proc in rgw.procs.values()):
            time.sleep(1)
        print("error: a daemon exited" + rgw._logs_of_running(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        rgw.stop()


if __name__ == "__main__":
    sys.exit(main())
