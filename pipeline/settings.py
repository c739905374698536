"""Every ``FORGELINE_*`` environment setting, read here and nowhere else.

Each setting is one function that takes an optional ``env`` mapping (default ``os.environ``), so a
caller can evaluate another environment (a pod's, a test's) without touching the process's. A bad
value raises :class:`SettingError` with one line naming the variable and what it accepts.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pipeline.keys import check_key

Env = Optional[Mapping[str, str]]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHM_ROOT = "/dev/shm/forgeline"
DEFAULT_MODEL_NAME = "digits"
DEFAULT_GPU_POOL = "gpu"


class SettingError(ValueError):
    """An environment setting is malformed; the message names the variable."""


def _env(env: Env) -> Mapping[str, str]:
    return os.environ if env is None else env


def raw(name: str, env: Env = None) -> str | None:
    """The stripped value of ``name``, or ``None`` when unset or empty."""
    value = _env(env).get(name, "").strip()
    return value or None


# ---------------------------------------------------------------------------------------------
# Value parsers (shared with the CLI, which accepts the same spellings)
# ---------------------------------------------------------------------------------------------

_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtTpPeE]?)(i?)([bB]?)")


def parse_size(text: str | int) -> int:
    """A byte count as users write it: ``1000``, ``100MB`` / ``2G`` (powers of 1000), ``512MiB`` /
    ``16Gi`` (powers of 1024, also Kubernetes quantities). ``ValueError`` otherwise."""
    m = _SIZE.fullmatch(str(text).strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 1000, 100MB, 512MiB, 16Gi)")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    if binary and not unit:
        raise ValueError(f"not a size: {text!r} (use e.g. 1000, 100MB, 512MiB, 16Gi)")
    power = " KMGTPE".index(unit) if unit else 0
    return int(num * (1024 if binary else 1000) ** power)


_QUANTITY = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[KMGTPE]i|[kKMGTPE])?")


def check_quantity(name: str, value: str) -> str:
    """``value`` if it is a Kubernetes memory quantity (``16Gi``, ``512Mi``, ``500M``: what a
    manifest takes verbatim, so no ``GiB``/``GB``), else :class:`SettingError` naming ``name``."""
    if not _QUANTITY.fullmatch(value.strip()):
        raise SettingError(f"{name}: not a Kubernetes memory quantity: {value!r} (use e.g. 16Gi, 512Mi)")
    return value.strip()


def gib(n_bytes: int) -> str:
    """Bytes as a whole-GiB Kubernetes quantity, rounded up."""
    return f"{max(1, math.ceil(n_bytes / 2**30))}Gi"


def size_setting(name: str, default: int | None, env: Env = None) -> int | None:
    value = raw(name, env)
    if value is None:
        return default
    try:
        n = parse_size(value)
    except ValueError as e:
        raise SettingError(f"{name}: {e}") from None
    if n <= 0:
        raise SettingError(f"{name}={value!r} must be a positive size")
    return n


def int_setting(name: str, default: int | None, env: Env = None, *, minimum: int = 0) -> int | None:
    value = raw(name, env)
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise SettingError(f"{name} must be an integer, got {value!r}") from None
    if n < minimum:
        raise SettingError(f"{name}={n} must be >= {minimum}")
    return n


def float_setting(name: str, default: float, env: Env = None, *, ok, need: str) -> float:
    """The finite number in ``name`` (``default`` when unset) that passes ``ok``; otherwise one
    line saying it must be ``need``."""
    value = raw(name, env)
    if value is None:
        return default
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and ok(v)):
        raise SettingError(f"{name} must be {need}, got {value!r}")
    return v


def json_setting(name: str, kind: type, default: Any, env: Env = None) -> Any:
    """The JSON value of ``name`` (``default`` when unset), which must be a ``kind`` (dict or list)."""
    value = raw(name, env)
    if value is None:
        return default
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise SettingError(f"{name} is not valid JSON ({e.msg} at character {e.pos}): {value!r}") from None
    if not isinstance(parsed, kind):
        want = "a JSON object" if kind is dict else "a JSON list" if kind is list else kind.__name__
        raise SettingError(f"{name} must be {want}, got {type(parsed).__name__}: {value!r}")
    return parsed


def path_setting(name: str, default: str | Path, env: Env = None) -> Path:
    """The directory ``name`` names (``default`` when unset): an absolute path, since the CLI, the
    daemon, the UI and every pod start in folders of their own and must all find the same place;
    and not a file. :class:`SettingError` naming ``name`` otherwise (the folder itself is made when
    first used)."""
    value = raw(name, env)
    path = Path(value) if value else Path(default)
    if not path.is_absolute():
        raise SettingError(f"{name}: {value!r} is a relative path: give an absolute one (e.g. {path.absolute()}), "
                           "the same for every process that reads it")
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is under the file {p}"
                raise SettingError(f"{name}: {path} {what}, not a directory")
            break
    return path


def _choice(name: str, default: str, allowed: tuple[str, ...], env: Env) -> str:
    value = (raw(name, env) or default).lower()
    if value not in allowed:
        raise SettingError(f"{name}={value!r}: use one of {', '.join(allowed)}")
    return value


def _name(name: str, default: str, env: Env) -> str:
    value = raw(name, env) or default
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise SettingError(f"{name}={value!r} must be a plain name (letters, digits, '.', '_', '-')")
    return value


# ---------------------------------------------------------------------------------------------
# Where things live
# ---------------------------------------------------------------------------------------------


def home(env: Env = None) -> Path:
    """``FORGELINE_HOME``: everything the embedded defaults write (default ``<project>/.forgeline``)."""
    return path_setting("FORGELINE_HOME", PROJECT_ROOT / ".forgeline", env)


S3_CONCURRENCY = 8  # the default of FORGELINE_S3_CONCURRENCY and of every S3 store's ``concurrency``
S3_MAX_CONCURRENCY = 32  # the default size of S3Storage's connection pool, one connection per request


@dataclass(frozen=True)
class StorageSettings:
    """Where the model store is: S3 when ``bucket`` is set, else the directory ``root``.
    Credentials are never here: boto3's chain (``AWS_*``) or Dagster ``EnvVar`` config supply them."""

    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region_name: str | None = None
    root: Path | None = None
    root_from_env: bool = False  # FORGELINE_STORAGE_ROOT was set (a shared mount, e.g. on Kubernetes)
    concurrency: int = S3_CONCURRENCY  # S3: requests in flight for one bulk transfer (s3_concurrency)

    @property
    def kind(self) -> str:
        return "s3" if self.bucket else "local"

    def spec(self) -> dict[str, Any]:
        """The store as a :func:`pipeline.storage.from_spec` spec (for processes outside Dagster)."""
        if self.bucket:
            return {"kind": "s3", "bucket": self.bucket, "prefix": self.prefix, "endpoint_url": self.endpoint_url,
                    "region_name": self.region_name, "concurrency": self.concurrency}
        return {"kind": "local", "root": str(self.root)}


_BUCKET_NAME = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")  # what boto3 accepts (S3 itself: 3-63, lowercase)


def s3_bucket_name(name: str, value: str) -> str:
    """``value`` when it is a bucket's name, else :class:`SettingError` naming ``name`` (the
    setting or parameter) and what is wrong: a bucket is named alone, not as a URL or path."""
    if not _BUCKET_NAME.fullmatch(value):
        alone = value.split("://", 1)[-1].split("/")[0]
        hint = (f"name the bucket alone, e.g. {alone!r}; the path after it is the prefix"
                if "/" in value and _BUCKET_NAME.fullmatch(alone) else "letters, digits, '.', '-' and '_'")
        raise SettingError(f"{name}: {value!r} is not a bucket name ({hint})")
    return value


def storage(env: Env = None) -> StorageSettings:
    """``FORGELINE_S3_BUCKET`` (+ ``FORGELINE_S3_PREFIX``, ``FORGELINE_S3_ENDPOINT_URL``,
    ``FORGELINE_S3_CONCURRENCY``, ``AWS_REGION``) → S3; else ``FORGELINE_STORAGE_ROOT``; else
    ``$FORGELINE_HOME/storage``."""
    region = raw("AWS_REGION", env) or raw("AWS_DEFAULT_REGION", env)
    if raw("FORGELINE_S3_BUCKET", env):
        prefix = (raw("FORGELINE_S3_PREFIX", env) or "").strip("/")
        if prefix:
            try:
                check_key(prefix)
            except ValueError as e:
                raise SettingError(f"FORGELINE_S3_PREFIX: {e}") from None
        return StorageSettings(bucket=s3_bucket_name("FORGELINE_S3_BUCKET", raw("FORGELINE_S3_BUCKET", env)),
                               prefix=prefix, endpoint_url=s3_endpoint(env), region_name=region,
                               concurrency=s3_concurrency(env))
    root = storage_root(env)
    return StorageSettings(root=root or home(env) / "storage", root_from_env=bool(root),
                           endpoint_url=s3_endpoint(env), region_name=region)


def storage_root(env: Env = None) -> Path | None:
    """``FORGELINE_STORAGE_ROOT``: the model store's directory (a shared mount on Kubernetes)."""
    return path_setting("FORGELINE_STORAGE_ROOT", "", env) if raw("FORGELINE_STORAGE_ROOT", env) else None


S3_ENDPOINT_EXAMPLE = "http://127.0.0.1:9000 or https://s3.example.com"


def s3_endpoint(env: Env = None) -> str | None:
    """``FORGELINE_S3_ENDPOINT_URL``: an S3-compatible endpoint (MinIO, Ceph RGW, ...), with its
    scheme (``http://minio:9000``); None = AWS."""
    value = raw("FORGELINE_S3_ENDPOINT_URL", env)
    return http_url("FORGELINE_S3_ENDPOINT_URL", value, implied=False, example=S3_ENDPOINT_EXAMPLE) if value else None


def s3_concurrency(env: Env = None) -> int:
    """``FORGELINE_S3_CONCURRENCY``: requests in flight for one bulk S3 transfer (a load's ranged
    GETs, a pre-warm's pieces, an upload's parts), 1..32; default 8. Raise it for a store far away
    or one that caps each connection's rate (AWS S3: ~100 MB/s per connection)."""
    n = int_setting("FORGELINE_S3_CONCURRENCY", S3_CONCURRENCY, env, minimum=1)
    if n > S3_MAX_CONCURRENCY:
        raise SettingError(f"FORGELINE_S3_CONCURRENCY={n} must be <= {S3_MAX_CONCURRENCY} (the S3 connection pool)")
    return n


def shm_root(env: Env = None) -> str:
    """``FORGELINE_SHM_ROOT``: the pre-warm tier's directory (default ``/dev/shm/forgeline``)."""
    return str(path_setting("FORGELINE_SHM_ROOT", DEFAULT_SHM_ROOT, env))


def shm_capacity_bytes(env: Env = None) -> int | None:
    """``FORGELINE_SHM_CAPACITY_BYTES``: the tier's byte budget (``64GiB``, ``512MB``, ``1000000``);
    unset = whatever the filesystem has free."""
    return size_setting("FORGELINE_SHM_CAPACITY_BYTES", None, env)


# ---------------------------------------------------------------------------------------------
# What runs
# ---------------------------------------------------------------------------------------------


def model_name(env: Env = None) -> str:
    """``FORGELINE_MODEL_NAME``: the model the lifecycle exports, watches and serves (default ``digits``)."""
    return _name("FORGELINE_MODEL_NAME", DEFAULT_MODEL_NAME, env)


def serve_sample_rate(env: Env = None) -> float:
    """``FORGELINE_SERVE_SAMPLE_RATE``: share of inference rows the model server samples back into
    ``incoming/serving-*/`` (0..1; default 0: off)."""
    return float_setting("FORGELINE_SERVE_SAMPLE_RATE", 0.0, env, ok=lambda v: 0.0 <= v <= 1.0,
                         need="a number within 0..1")


def serve_sample_window_s(env: Env = None) -> float:
    """``FORGELINE_SERVE_SAMPLE_WINDOW_S``: seconds after its first sample a traffic window closes (default 300)."""
    return float_setting("FORGELINE_SERVE_SAMPLE_WINDOW_S", 300.0, env, ok=lambda v: v > 0,
                         need="a positive number of seconds")


def serve_sample_window_samples(env: Env = None) -> int:
    """``FORGELINE_SERVE_SAMPLE_WINDOW_SAMPLES``: samples at which a traffic window closes early (default 10000)."""
    return int_setting("FORGELINE_SERVE_SAMPLE_WINDOW_SAMPLES", 10_000, env, minimum=1)


def gpu_pool(env: Env = None) -> str:
    """``FORGELINE_GPU_POOL``: the Dagster concurrency pool every GPU step declares (default ``gpu``)."""
    return _name("FORGELINE_GPU_POOL", DEFAULT_GPU_POOL, env)


def gpus_per_run(env: Env = None) -> int | None:
    """``FORGELINE_GPUS_PER_RUN``: GPUs one GPU step leases (unset: all free ones)."""
    return int_setting("FORGELINE_GPUS_PER_RUN", None, env, minimum=1)


def executor(env: Env = None) -> str:
    """``FORGELINE_EXECUTOR``: ``default`` (Dagster's multiprocess executor) or ``k8s`` (a pod per step)."""
    return _choice("FORGELINE_EXECUTOR", "default", ("default", "k8s"), env)


def compile_cache(env: Env = None) -> tuple[str, str | None]:
    """``FORGELINE_COMPILE_CACHE`` (``local``, ``storage`` or ``redis``) and, for redis,
    ``FORGELINE_COMPILE_CACHE_URL``."""
    kind = _choice("FORGELINE_COMPILE_CACHE", "local", ("local", "storage", "redis"), env)
    url = raw("FORGELINE_COMPILE_CACHE_URL", env)
    if kind == "redis" and not url:
        raise SettingError("FORGELINE_COMPILE_CACHE=redis needs FORGELINE_COMPILE_CACHE_URL (redis://host:port/db)")
    if url:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
            ok = parts.path if parts.scheme == "unix" else parts.scheme in ("redis", "rediss") and parts.hostname
        except ValueError:
            ok = False
        if not ok:
            raise SettingError(f"FORGELINE_COMPILE_CACHE_URL: not a Redis URL: {url!r} "
                               "(use e.g. redis://host:6379/0, rediss://... or unix:///path/to/redis.sock)")
    return kind, url


def compile_cache_dir(env: Env = None) -> Path:
    """Where the ``local`` compile cache keeps its entries: ``$FORGELINE_HOME/compile-cache``."""
    return home(env) / "compile-cache"


def cron(name: str, default: str, env: Env = None) -> str:
    """A schedule's cron expression (``FORGELINE_INGEST_CRON``, ``FORGELINE_RETRAIN_CRON``); the
    caller validates it with Dagster's parser (the engine does not import dagster)."""
    return raw(name, env) or default


def retrain_attempts(env: Env = None) -> int:
    """``FORGELINE_RETRAIN_ATTEMPTS``: how many runs an automatic retrain gets in all, the first
    included, before a failing one is left alone (default 3; 1 = never requested again)."""
    return int_setting("FORGELINE_RETRAIN_ATTEMPTS", 3, env, minimum=1)


def timezone(env: Env = None) -> str:
    """``FORGELINE_TIMEZONE``: the schedules' IANA timezone (default UTC)."""
    tz = raw("FORGELINE_TIMEZONE", env) or "UTC"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingError(f"FORGELINE_TIMEZONE={tz!r} is not an IANA timezone (e.g. 'UTC', 'Europe/Berlin')") from None
    return tz


def train_fault(env: Env = None) -> str | None:
    """``FORGELINE_TRAIN_FAULT``: the test suite's chaos hook (``rank:epoch:step:kill|exit|abort|hang``)."""
    return raw("FORGELINE_TRAIN_FAULT", env)


def debug(env: Env = None) -> bool:
    """``FORGELINE_DEBUG=1``: the CLIs print full tracebacks instead of one line per error."""
    return (raw("FORGELINE_DEBUG", env) or "").strip().lower() in ("1", "true", "yes", "on")


def http_url(name: str, value: str, schemes: tuple[str, ...] = (), *, implied: bool = True,
             example: str = "http://forgeline-serving:8000") -> str:
    """``value`` as an absolute http(s) (or one of ``schemes``) URL without a trailing slash;
    ``host:port`` gets ``http://`` when ``implied``, else it is refused (an S3 endpoint: guessing
    http for a server that speaks https would fail later, and less clearly). :class:`SettingError`
    naming ``name`` (the setting or parameter) otherwise."""
    from urllib.parse import urlsplit

    url = value.strip()
    if "://" not in url:
        if not implied:
            raise SettingError(f"{name}: {value!r} has no scheme (use e.g. {example})")
        url = "http://" + url
    url = url.rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise SettingError(f"{name}: not a URL: {value!r} ({e})") from None
    if parts.scheme not in ("http", "https", *schemes) or not parts.hostname or parts.query or parts.fragment:
        raise SettingError(f"{name}: not an http(s) URL: {value!r} (use e.g. {example})")
    return url


def serve_urls(env: Env = None) -> list[str]:
    """``FORGELINE_SERVE_URLS``: the model servers the rollout waits for and ``served_models``
    records, comma-separated (``http://10.0.0.5:8000,serving-1:8000``; ``http://`` is implied).
    ``dns+http://name:port`` stands for every address ``name`` resolves to when it is used (a
    headless Service: every serving pod). Unset or empty: none (the rollout passes and says so)."""
    value = raw("FORGELINE_SERVE_URLS", env)
    urls: list[str] = []
    for part in (value or "").split(","):
        if part.strip():
            url = http_url("FORGELINE_SERVE_URLS", part, ("dns+http", "dns+https"))
            if url not in urls:
                urls.append(url)
    return urls


def reports_url(env: Env = None) -> str | None:
    """``FORGELINE_REPORTS_URL``: base URL of a ``forgeline serve`` that serves the drift reports
    (``GET /reports/...``); the drift checks then link the report there instead of its storage path."""
    value = raw("FORGELINE_REPORTS_URL", env)
    return http_url("FORGELINE_REPORTS_URL", value) if value else None


# ---------------------------------------------------------------------------------------------
# Kubernetes (read by the executor config, the training node Job and the pre-warm DaemonSet)
# ---------------------------------------------------------------------------------------------


def image(env: Env = None) -> str | None:
    """``FORGELINE_IMAGE``, else the Dagster chart's ``DAGSTER_CURRENT_IMAGE``."""
    return raw("FORGELINE_IMAGE", env) or raw("DAGSTER_CURRENT_IMAGE", env)


def k8s_namespace(env: Env = None) -> str | None:
    return raw("FORGELINE_K8S_NAMESPACE", env)


def k8s_s3_secret(env: Env = None) -> str | None:
    """``FORGELINE_K8S_S3_SECRET``: the Secret whose keys (``FORGELINE_S3_*``, ``AWS_*``) every pod gets."""
    return raw("FORGELINE_K8S_S3_SECRET", env)


def k8s_model_store_pvc(env: Env = None) -> str | None:
    """``FORGELINE_K8S_MODEL_STORE_PVC``: a ReadWriteMany claim mounted at ``FORGELINE_STORAGE_ROOT``."""
    pvc = raw("FORGELINE_K8S_MODEL_STORE_PVC", env)
    if pvc and not storage_root(env):
        raise SettingError(f"FORGELINE_K8S_MODEL_STORE_PVC={pvc!r} needs FORGELINE_STORAGE_ROOT: the path the "
                           "volume is mounted at, which is also the storage root every pod uses")
    return pvc


def k8s_shm_tier_host_path(env: Env = None) -> str:
    return raw("FORGELINE_K8S_SHM_TIER_HOST_PATH", env) or DEFAULT_SHM_ROOT


def k8s_shm_size(env: Env = None) -> str | None:
    """``FORGELINE_K8S_SHM_SIZE``: the GPU pods' memory-backed /dev/shm (``32Gi``; ``none`` = the
    runtime's default). Returns the quantity, ``"none"``, or None when unset."""
    value = raw("FORGELINE_K8S_SHM_SIZE", env)
    if value is None or value.lower() == "none":
        return value and "none"
    return check_quantity("FORGELINE_K8S_SHM_SIZE", value)


def k8s_gpu_resource(env: Env = None) -> str | None:
    return raw("FORGELINE_K8S_GPU_RESOURCE", env)


def k8s_gpu_node_selector(env: Env = None) -> dict | None:
    selector = json_setting("FORGELINE_K8S_GPU_NODE_SELECTOR", dict, None, env)
    if selector is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in selector.items()):
        raise SettingError(f"FORGELINE_K8S_GPU_NODE_SELECTOR must map label names to string values, got {selector!r}")
    return selector


def k8s_gpu_tolerations(env: Env = None) -> list | None:
    tolerations = json_setting("FORGELINE_K8S_GPU_TOLERATIONS", list, None, env)
    if tolerations is not None and not all(isinstance(t, dict) for t in tolerations):
        raise SettingError(f"FORGELINE_K8S_GPU_TOLERATIONS must be a list of objects, got {tolerations!r}")
    return tolerations


def k8s_serving_node_selector(default: dict | None, env: Env = None) -> dict | None:
    return json_setting("FORGELINE_K8S_SERVING_NODE_SELECTOR", dict, default, env)


def k8s_resources(name: str, default: dict, env: Env = None) -> dict:
    """``FORGELINE_K8S_STEP_RESOURCES`` / ``FORGELINE_K8S_GPU_STEP_RESOURCES``: a JSON object with
    ``requests`` and/or ``limits``."""
    res = json_setting(name, dict, default, env)
    unknown = set(res) - {"requests", "limits"}
    if unknown:
        raise SettingError(f"{name} takes 'requests' and 'limits', not {sorted(unknown)}: {res!r}")
    return res


def check(env: Env = None) -> None:
    """Read every setting once, so that a malformed one stops whoever loads the code location at
    once, in one line naming it, not later in the step that happens to use it (a rollout after a
    whole training run)."""
    storage(env), s3_concurrency(env), shm_root(env), shm_capacity_bytes(env), compile_cache(env)
    model_name(env), gpu_pool(env), gpus_per_run(env), executor(env), timezone(env), retrain_attempts(env)
    serve_sample_rate(env), serve_sample_window_s(env), serve_sample_window_samples(env)
    serve_urls(env), reports_url(env)
    k8s_model_store_pvc(env), k8s_shm_size(env), k8s_gpu_node_selector(env), k8s_gpu_tolerations(env)
    k8s_serving_node_selector(None, env)
    for name in ("FORGELINE_K8S_STEP_RESOURCES", "FORGELINE_K8S_GPU_STEP_RESOURCES"):
        k8s_resources(name, {}, env)
