"""Compile artifact caching: compile once, ship the compiled artifacts, load them elsewhere.

Two ways, one for each job:

- :func:`aot_compile_with_cache` (the model server's ``--compile``): an AOTInductor package
  (``torch.export`` + ``aoti_compile_and_package``) of an eval-mode module for one input with a
  batch range, built without its weights, which are bound at load from the module's own tensors.
  A hit is fetch, dlopen, bind: well under a second, no tracing, no lowering. It needs a program
  ``torch.export`` captures whole; for one it cannot, it falls back to the other way.
- :func:`compile_with_cache`: ``torch.compile`` of any callable (graph breaks, data-dependent
  control flow, training, functions) with Inductor's mega-cache, described below. Its hit still
  runs Dynamo tracing and graph lowering in the loading process.

A cold ``torch.compile`` spends its time in Dynamo tracing, AOTAutograd, Inductor lowering and code
generation, autotuning (``mode="max-autotune"``) and building kernels (Triton on GPU, C++ with gcc
on CPU). Inductor keeps the results in its local on-disk caches (``TORCHINDUCTOR_CACHE_DIR``: the FX
graph cache and the AOTAutograd cache, both on by default); ``torch.compiler.save_cache_artifacts()``
(the "mega-cache") serializes the entries one process produced or used, and
``torch.compiler.load_cache_artifacts(bytes)`` writes them into another process's local caches, so
its compile finds them there. What is left for the warm process is Dynamo tracing, the cache lookups
and loading the kernels. This module keeps those bytes in an :class:`ArtifactCache` under a key that
names everything they depend on.

The key names the program, not the weights (:func:`cache_key`, :func:`architecture`): the model's
architecture (module tree with classes and train/eval flags; parameter and buffer names, shapes,
dtypes, ``requires_grad``, tying; the bytecode of non-torch module classes), input shapes and
dtypes, compile mode, ``dynamic``, grad mode, the device (GPU model and capability, or CPU ISA and
feature flags) and torch / triton / Python versions. Weights are inputs of the compiled graphs, so
the entry stored for version 1 of a model serves version 2 (retrained, same architecture), and the
compiled model computes with its own weights.

What the mega-cache holds (torch 2.13): the FX graph cache entries (``inductor``: pickled compiled
graphs, with the Triton kernels bundled inside on GPU), the AOTAutograd cache entries
(``aot_autograd``), autotuning results (``autotune``) and profile-guided dynamic-shape hints
(``pgo``). It does **not** hold the C++ kernels Inductor builds on CPU (``*.so`` under the cache
dir): a warm CPU process still runs gcc for every kernel. ``compile_with_cache`` therefore also
bundles those binaries for CPU targets (``bundle_cpu_kernels=True``); they are restored under the
names Inductor looks for (a hash of source + compiler command line), so an unused or stale binary
is never picked up for other code. Because Inductor builds them with ``-march=native``, the key of a
CPU entry includes a hash of the CPU's feature flags.

Entries are framed (magic, format version, sha256, key components, payload): a corrupt, truncated,
mis-filed or other-version entry reads as a miss with a reason, and every backend failure (Redis
down, S3 errors, a full disk) becomes a warning. A cache problem never fails a compile; it only
costs a cold one. Inductor's own cache keys are content hashes of the graph, the configuration and
the torch build, so loaded artifacts that do not fit the program are simply not used (and
:class:`CompileReport` says so): they cannot produce wrong results.

Trust: artifacts are pickles and native libraries that the compiling process loads. Whoever can
write to the cache backend can run code in every process that reads it; use a private bucket /
Redis / directory.

The AOTI entries share keys (:func:`aot_cache_key`: the same components, plus the batch range and
``artifact: aoti-package-v1``, so never a mega-cache entry's key), framing and backends. Their
payload is the ``.pt2`` package plus the shape, dtype and stride of every constant it reads, checked
against the module before binding (``load_constants`` checks neither). Inductor may not inline
small tensors into the code or fold weights (a package would then serve the compiling version's
values to every version): the package options forbid both, and a build that still reads fewer
weights than the program is refused.

Usage::

    cache = RedisCache("redis://cache:6379/0", ttl_s=7 * 86400)   # or LocalDirCache(path), StorageCache(S3Storage(...))
    compiled, report = compile_with_cache(model.eval(), (example,), cache, mode="max-autotune")
    report.hit, report.seconds_compile_first_call, report.warnings
    serve, report = aot_compile_with_cache(model.eval(), example, cache, max_batch_size=32)
    report.kind, report.hit, report.op_seconds   # "aoti" (or "torch.compile": report.fallback_reason)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
import types
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.storage import LocalStorage, ObjectNotFound, Storage, join, write_file_atomic

FORMAT_VERSION = 1
MAGIC = b"FLCCACHE"  # 8 bytes
_HEADER = struct.Struct(">8sHI32s")  # magic, format version, len(meta JSON), sha256(meta + payload)
_BUNDLE_HEADER = struct.Struct(">I")  # len(manifest JSON)
_KERNEL_SUFFIXES = (".so", ".o", ".cpp", ".h")
_KERNEL_PATH = re.compile(r"^[a-z0-9_]{2}/[A-Za-z0-9_.-]+$")  # "<2 chars>/<file>" under the cache dir
# torch.compile's first call imports torch modules that still use torch.jit.script_method; the
# deprecation is torch's own, not a call of ours.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning,
                        module=r"torch\.jit\._script")
# torch.export deep-copies pytree specs, which trips torch's own deprecation of LeafSpec checks.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------


def _code_digest(code: types.CodeType, h) -> None:
    """Feed what a code object executes into ``h``: bytecode, names and constants (nested code
    objects recursively, sets sorted), not its file name or line numbers, so the same source at
    another path or line hashes the same."""
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)).encode())

    def const(c: Any) -> None:
        if isinstance(c, types.CodeType):
            _code_digest(c, h)
        elif isinstance(c, (frozenset, set)):
            h.update(b"{" + "|".join(sorted(repr(x) for x in c)).encode() + b"}")
        elif isinstance(c, tuple):
            h.update(b"(")
            for x in c:
                const(x)
            h.update(b")")
        else:
            h.update(f"{type(c).__name__}:{c!r};".encode())

    for c in code.co_consts:
        const(c)


def _class_digest(cls: type, h) -> None:
    """The code of the methods ``cls`` and its bases define, up to torch's own classes (those are
    covered by the torch version in the key)."""
    for klass in cls.__mro__:
        if klass is object or (getattr(klass, "__module__", "") or "").split(".")[0] == "torch":
            continue
        h.update(f"class {klass.__module__}.{klass.__qualname__}\0".encode())
        for name, attr in sorted(vars(klass).items()):
            fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            fn = fn.fget if isinstance(fn, property) else fn
            code = getattr(fn, "__code__", None)
            if isinstance(code, types.CodeType):
                h.update(f"def {name}\0".encode())
                _code_digest(code, h)


def _plain(v: Any) -> str:
    """A module attribute as the key sees it: the value of plain data (numbers, strings, dtypes,
    containers of them), a tensor's shape, dtype and bytes (a constant the program inlines), the
    qualified name of a function or class, else the type's name."""
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
        return repr(v)
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(_plain(x) for x in v) + "]"
    if isinstance(v, dict):
        items = sorted(v.items(), key=lambda kv: repr(kv[0]))
        return "{" + ",".join(f"{_plain(k)}:{_plain(x)}" for k, x in items) + "}"
    if isinstance(v, torch.Tensor):
        data = hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest() \
            if v.device.type != "meta" and v.numel() <= 1 << 20 else "?"
        return f"tensor({list(v.shape)},{v.dtype},{data})"
    target = v if callable(v) and hasattr(v, "__qualname__") else type(v)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


def _module_config(mod: torch.nn.Module) -> str:
    """The settings a module keeps outside its tensors (a conv's stride and padding, an
    activation's slope, a dropout's p): its public attributes, which its ``forward`` reads."""
    public = sorted(((k, v) for k, v in vars(mod).items() if not k.startswith("_") and k != "training"),
                    key=lambda kv: kv[0])
    return ",".join(f"{k}={_plain(v)}" for k, v in public)


def architecture(model: Any) -> tuple[str, dict[str, Any]]:
    """``(digest, summary)`` of the program ``model`` is, without its weight values: every
    submodule's name, class, train/eval flag and settings (its public non-tensor attributes: a
    conv's stride, an activation's slope); every parameter's and buffer's name, shape, dtype
    and ``requires_grad`` (tied parameters named as such, non-persistent buffers marked); and the
    bytecode of the methods of non-torch module classes. Two versions of a model that differ only
    in weight values get the same digest; one changed layer size, dtype, name or ``forward`` gets
    another. ``model`` may also be a plain function (its code is hashed). Tensors on the meta
    device are fine here (only their metadata is read)."""
    h = hashlib.sha256(b"forgeline-architecture-v2\0")  # v2: module settings are part of it
    if not isinstance(model, torch.nn.Module):
        target = model if hasattr(model, "__code__") else type(model)
        name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
        h.update(name.encode() + b"\0")
        if isinstance(getattr(target, "__code__", None), types.CodeType):
            _code_digest(target.__code__, h)
        else:
            _class_digest(target, h)
        return h.hexdigest(), {"model_class": name}
    classes: dict[str, type] = {}
    n_modules = 0
    for name, mod in model.named_modules(remove_duplicate=False):
        cls = type(mod)
        qual = f"{cls.__module__}.{cls.__qualname__}"
        classes.setdefault(qual, cls)
        h.update(f"m|{name}|{qual}|{int(mod.training)}|{_module_config(mod)}\0".encode())
        n_modules += 1
    first: dict[int, str] = {}
    n_tensors = 0
    for kind, items in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            tied = first.setdefault(id(t), name)
            h.update(f"{kind}|{name}|{tuple(t.shape)}|{t.dtype}|{int(t.requires_grad)}|"
                     f"{tied if tied != name else ''}\0".encode())
            n_tensors += 1
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            h.update(f"np|{mod_name}.{b}\0".encode())
    for qual in sorted(classes):
        _class_digest(classes[qual], h)
    top = type(model)
    return h.hexdigest(), {"model_class": f"{top.__module__}.{top.__qualname__}",
                           "modules": n_modules, "tensors": n_tensors}


def _triton_version() -> str | None:
    try:
        import triton  # noqa: PLC0415

        return str(triton.__version__)
    except Exception:  # noqa: BLE001 - absent or broken: not part of this build
        return None


def _cpu_flags_hash() -> str | None:
    """Hash of the CPU feature flags (Linux /proc/cpuinfo): Inductor builds CPU kernels with
    ``-march=native``, so their binaries are only valid on CPUs with the same features."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = sorted(set(line.split(":", 1)[1].split()))
                    return hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16]
    except OSError:
        pass
    return None


def device_components(device: str | torch.device) -> dict[str, Any]:
    """What compiled code for ``device`` depends on: GPU model and compute capability (CUDA), or
    the CPU's vector ISA, architecture and feature flags (CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available in this process")
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return {
            "device_type": "cuda",
            "device_name": torch.cuda.get_device_name(idx),
            "capability": f"sm_{major}{minor}",
            "cuda": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None),
        }
    if dev.type == "cpu":
        try:
            isa = torch.backends.cpu.get_cpu_capability()
        except Exception:  # noqa: BLE001
            isa = None
        return {
            "device_type": "cpu",
            "cpu_isa": isa,
            "machine": platform.machine(),
            "cpu_flags": _cpu_flags_hash(),
            "libc": "-".join(platform.libc_ver()) or None,
        }
    return {"device_type": dev.type}


def cache_key(
    *,
    architecture: str,
    input_shapes: list[tuple],
    dtype: str,
    mode: str,
    device: str,
    dynamic: bool = False,
    extra: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """``(key, components)``: a stable hex key (sha256 of the canonical JSON of ``components``)
    and the components: format version, torch version (+ git commit), triton version or None,
    Python version (Dynamo works on bytecode), device identity (:func:`device_components`),
    the architecture digest (:func:`architecture`: no weight values), input shapes, input dtypes,
    compile mode, ``dynamic`` and any ``extra`` entries."""
    components: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "triton": _triton_version(),
        "python": f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}",
        **device_components(device),
        "architecture": architecture,
        "input_shapes": [list(s) if isinstance(s, (tuple, list, torch.Size)) else s for s in input_shapes],
        "dtype": str(dtype),
        "mode": mode or "default",
        "dynamic": dynamic,
        **(extra or {}),
    }
    components = json.loads(json.dumps(components, sort_keys=True, default=str))  # canonical, JSON-safe
    canon = json.dumps(components, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest(), components


# ---------------------------------------------------------------------------------------------
# framing
# ---------------------------------------------------------------------------------------------


class EntryError(ValueError):
    """A stored entry is not usable: corrupt, truncated, another format, or for another key."""


def frame(key: str, components: dict[str, Any] | None, payload: bytes) -> bytes:
    """``MAGIC | format version | len(meta) | sha256(meta + payload) | meta JSON | payload``, where
    meta holds the key and its components."""
    meta = json.dumps({"key": key, "components": components or {}, "payload_bytes": len(payload)},
                      sort_keys=True, default=str).encode()
    digest = hashlib.sha256(meta)
    digest.update(payload)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(meta), digest.digest()) + meta + payload


def unframe(data: bytes, key: str, components: dict[str, Any] | None = None) -> bytes:
    """The payload of a framed entry, after checking it; :class:`EntryError` says what is wrong."""
    if len(data) < _HEADER.size:
        raise EntryError(f"truncated entry ({len(data)} bytes, header needs {_HEADER.size})")
    magic, version, meta_len, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise EntryError("not a forgeline compile-cache entry (bad magic)")
    if version != FORMAT_VERSION:
        raise EntryError(f"entry format version {version}, this forgeline reads {FORMAT_VERSION}")
    body = memoryview(data)[_HEADER.size:]
    if len(body) < meta_len:
        raise EntryError(f"truncated entry (meta needs {meta_len} bytes, {len(body)} present)")
    if hashlib.sha256(body).digest() != digest:
        raise EntryError("corrupt entry: sha256 mismatch")
    try:
        meta = json.loads(bytes(body[:meta_len]))
    except ValueError as e:
        raise EntryError(f"corrupt entry: unreadable meta ({e})") from None
    payload = bytes(body[meta_len:])
    if meta.get("payload_bytes") != len(payload):
        raise EntryError(f"corrupt entry: payload is {len(payload)} bytes, meta says {meta.get('payload_bytes')}")
    if meta.get("key") != key:
        raise EntryError(f"entry was written for key {meta.get('key')!r}, not {key!r}")
    if components is not None:
        stored = meta.get("components") or {}
        expected = json.loads(json.dumps(components, sort_keys=True, default=str))
        diffs = [
            f"{k}: entry {stored.get(k)!r} != expected {expected.get(k)!r}"
            for k in sorted(set(stored) | set(expected))
            if stored.get(k) != expected.get(k)
        ]
        if diffs:
            raise EntryError("key components differ: " + "; ".join(diffs))
    return payload


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------


def _describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


class ArtifactCache(ABC):
    """Key → bytes store for compile artifacts. ``get``/``put`` frame and check entries and never
    raise for backend failures: ``get`` returns None and sets ``last_miss_reason`` (and
    ``last_error`` when the backend failed); ``put`` sets ``last_error`` on failure."""

    def __init__(self) -> None:
        self.last_miss_reason: str | None = None
        self.last_error: str | None = None

    # backend primitives: raise on failure; _get_raw returns None when the key is absent
    @abstractmethod
    def _get_raw(self, key: str) -> bytes | None: ...

    @abstractmethod
    def _put_raw(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def describe(self) -> str:
        """Where entries live, without credentials (``local:/path``, ``s3://b/p``, ``redis://h:p/0``)."""

    def get(self, key: str, *, components: dict[str, Any] | None = None) -> bytes | None:
        """The payload stored under ``key``, or None (see ``last_miss_reason``). With ``components``,
        an entry written with other components (another torch, GPU, model…) is a miss. An
        invalid key (not ``[A-Za-z0-9_.-]``) is a caller error: ValueError."""
        _check_key(key)
        self.last_miss_reason = self.last_error = None
        try:
            data = self._get_raw(key)
        except Exception as e:  # noqa: BLE001 - any backend failure is a miss, never a crash
            self.last_error = f"{self.describe()}: get failed: {_describe_error(e)}"
            self.last_miss_reason = f"backend error ({self.last_error})"
            return None
        if data is None:
            self.last_miss_reason = "no entry"
            return None
        try:
            return unframe(data, key, components)
        except EntryError as e:  # named with where it is, so a damaged entry can be found
            self.last_miss_reason = f"{e} (entry {key} in {self.describe()})"
            return None

    def put(self, key: str, data: bytes, *, components: dict[str, Any] | None = None) -> None:
        """Store ``data`` under ``key`` (framed with ``components``); failures set ``last_error``."""
        _check_key(key)
        self.last_error = None
        try:
            self._put_raw(key, frame(key, components, data))
        except Exception as e:  # noqa: BLE001
            self.last_error = f"{self.describe()}: put failed: {_describe_error(e)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"


def _check_key(key: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", key) or key.startswith("."):
        raise ValueError(f"invalid compile-cache key {key!r}: use letters, digits, '_', '-', '.'")
    return key


class StorageCache(ArtifactCache):
    """Entries as objects ``<prefix>/<key>.flcc`` of a :class:`~pipeline.storage.Storage` (local
    path, NFS, S3 via ``S3Storage``); writes are the storage's atomic writes."""

    def __init__(self, storage: Storage, prefix: str = "compile-cache"):
        super().__init__()
        self.storage = storage
        self.prefix = prefix.strip("/")

    def _object(self, key: str) -> str:
        return join(self.prefix, f"{_check_key(key)}.flcc")

    def _get_raw(self, key: str) -> bytes | None:
        try:
            return self.storage.read(self._object(key))
        except ObjectNotFound:
            return None

    def _put_raw(self, key: str, data: bytes) -> None:
        self.storage.write_atomic(self._object(key), data)

    def describe(self) -> str:
        uri = self.storage.uri(self.prefix) if self.prefix else self.storage.uri()
        return uri if "://" in uri else f"local:{uri}"


class LocalDirCache(StorageCache):
    """Entries as files ``<path>/<key>.flcc``, written atomically (temp file, fsync, sha256
    re-check, rename), so concurrent writers and readers never see a partial entry."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(LocalStorage(path), prefix="")
        self.path = self.storage.root  # type: ignore[attr-defined]

    def describe(self) -> str:
        return f"local:{self.path}"


class RedisCache(ArtifactCache):
    """Entries as Redis strings ``<prefix><key>`` (optionally expiring after ``ttl_s``). Short
    socket timeouts and one retry keep an unreachable Redis from stalling a compile for long.
    A Redis string holds at most 512 MB (``proto-max-bulk-len``)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "forgeline:compile:",
        ttl_s: int | None = None,
        socket_timeout_s: float = 2,
        retries: int = 1,
    ):
        super().__init__()
        import redis  # noqa: PLC0415 - optional backend
        from redis.backoff import NoBackoff  # noqa: PLC0415
        from redis.retry import Retry  # noqa: PLC0415

        self.url = url
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), retries),
        )

    def _get_raw(self, key: str) -> bytes | None:
        return self.client.get(self.prefix + _check_key(key))

    def _put_raw(self, key: str, data: bytes) -> None:
        self.client.set(self.prefix + _check_key(key), data, ex=self.ttl_s)

    def describe(self) -> str:
        url = re.sub(r"//[^@/]*@", "//", self.url)  # drop user:password
        return f"{url} prefix={self.prefix}"


# ---------------------------------------------------------------------------------------------
# payload: mega-cache bytes + CPU kernel binaries
# ---------------------------------------------------------------------------------------------


def pack_bundle(mega_cache: bytes, files: dict[str, bytes] | None = None) -> bytes:
    """``len(manifest) | manifest JSON | mega-cache bytes | file bytes…``; ``files`` maps paths
    relative to the Inductor cache dir to their contents."""
    entries, blobs, offset = [], [mega_cache], len(mega_cache)
    for path in sorted(files or {}):
        data = files[path]  # type: ignore[index]
        entries.append({"path": path, "offset": offset, "length": len(data)})
        blobs.append(data)
        offset += len(data)
    manifest = json.dumps({"mega_cache": [0, len(mega_cache)], "files": entries}).encode()
    return _BUNDLE_HEADER.pack(len(manifest)) + manifest + b"".join(blobs)


def unpack_bundle(payload: bytes) -> tuple[bytes, dict[str, bytes]]:
    """Inverse of :func:`pack_bundle`; raises :class:`EntryError` on anything malformed."""
    try:
        (n,) = _BUNDLE_HEADER.unpack_from(payload)
        manifest = json.loads(payload[_BUNDLE_HEADER.size:_BUNDLE_HEADER.size + n])
        base = _BUNDLE_HEADER.size + n
        off, length = manifest["mega_cache"]
        mega = payload[base + off:base + off + length]
        files = {}
        for e in manifest["files"]:
            if not _KERNEL_PATH.match(e["path"]) or ".." in e["path"]:
                raise EntryError(f"bad kernel path {e['path']!r} in bundle")
            files[e["path"]] = payload[base + e["offset"]:base + e["offset"] + e["length"]]
        if len(mega) != length or any(len(files[e["path"]]) != e["length"] for e in manifest["files"]):
            raise EntryError("bundle shorter than its manifest")
    except EntryError:
        raise
    except Exception as e:  # noqa: BLE001
        raise EntryError(f"malformed bundle ({_describe_error(e)})") from None
    return mega, files


def _inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # noqa: PLC0415

    return Path(cache_dir())


def _kernel_files(root: Path) -> set[str]:
    """Relative paths of C++ kernel sources/binaries in the Inductor cache dir's hash subdirs."""
    out: set[str] = set()
    try:
        subdirs = [d for d in os.scandir(root) if len(d.name) == 2 and d.is_dir()]
    except OSError:
        return out
    for d in subdirs:
        try:
            for f in os.scandir(d.path):
                if f.name.endswith(_KERNEL_SUFFIXES) and f.is_file():
                    out.add(f"{d.name}/{f.name}")
        except OSError:
            continue
    return out


def _cpp_cache_keys() -> set[str]:
    """Keys of the C++ libraries this process has loaded (Inductor's in-memory code caches)."""
    keys: set[str] = set()
    try:
        from torch._inductor import codecache  # noqa: PLC0415

        for name in ("CppCodeCache", "CppPythonBindingsCodeCache", "CppWrapperCodeCache"):
            cls = getattr(codecache, name, None)
            keys.update(k for k in getattr(cls, "cache", {}) if isinstance(k, str))
    except Exception:  # noqa: BLE001 - internals moved: the directory diff still works
        pass
    return keys


def _files_for_keys(root: Path, keys: set[str]) -> set[str]:
    out: set[str] = set()
    for key in keys:
        sub = root / key[1:3]
        if not sub.is_dir():
            continue
        for f in sub.glob(f"{key}.*"):
            if f.name.endswith(_KERNEL_SUFFIXES) and f.is_file():
                out.add(f"{sub.name}/{f.name}")
    return out


def _restore_kernels(root: Path, files: dict[str, bytes]) -> int:
    """Write bundled kernel files that are not there yet (atomically); returns how many."""
    written = 0
    for rel, data in files.items():
        dst = root / rel
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(dst, data, mode=0o755 if rel.endswith(".so") else 0o644, durable=False)
        written += 1
    return written


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------


@dataclass
class CompileReport:
    hit: bool  # an entry was found, checked and loaded before the compile
    key: str | None
    seconds_compile_first_call: float  # torch.compile + first call (CUDA synchronized); AOTI: package build
    artifact_bytes: int  # size of the payload loaded (hit) or stored (miss)
    saved: bool  # a new entry was stored
    warnings: list[str] = field(default_factory=list)
    backend: str = "none"
    miss_reason: str | None = None  # why there was no hit ("no entry", "corrupt entry: …", …)
    seconds_fetch: float = 0.0  # backend get
    seconds_load: float = 0.0  # kernel restore + load_cache_artifacts; AOTI: package load + weights + first call
    seconds_save: float = 0.0  # save_cache_artifacts + put
    seconds_total: float = 0.0  # everything, from fetch to the stored entry
    artifacts: dict[str, int] = field(default_factory=dict)  # mega-cache entries by type
    kernel_files: int = 0  # CPU kernel files bundled (miss) or restored (hit)
    inductor_cache: dict[str, int] = field(default_factory=dict)  # hits/misses during this compile
    components: dict[str, Any] = field(default_factory=dict)
    kind: str = "torch.compile"  # what serves: "torch.compile" (mega-cache entry) or "aoti" (AOTInductor package)
    seconds_export: float = 0.0  # torch.export (AOTI miss)
    fallback_reason: str | None = None  # why aot_compile_with_cache fell back to torch.compile

    def to_metadata(self) -> dict[str, Any]:
        """JSON-safe dict (for Dagster metadata / logs)."""
        return asdict(self)

    @property
    def op_seconds(self) -> dict[str, float]:
        """Seconds of each cache/compile operation that ran: ``fetch``, ``load`` (hit),
        ``export`` (AOTI miss), ``compile`` (torch.compile + first call; AOTI: the package build),
        ``save`` (miss)."""
        ops = {"fetch": self.seconds_fetch, "load": self.seconds_load, "export": self.seconds_export,
               "compile": self.seconds_compile_first_call, "save": self.seconds_save}
        return {k: v for k, v in ops.items() if v > 0}


def _fresh_artifact_recording():
    """Collect only this compile's mega-cache artifacts (the process-wide recorder otherwise
    accumulates every compile since start-up). Private torch API; without it, entries may also
    carry artifacts of earlier compiles in this process, which is harmless."""
    try:
        from torch.compiler._cache import CacheArtifactManager  # noqa: PLC0415

        return CacheArtifactManager.with_fresh_cache()
    except Exception:  # noqa: BLE001
        return contextlib.nullcontext()


_COUNTERS = {
    "fxgraph_hit": ("inductor", "fxgraph_cache_hit"),
    "fxgraph_miss": ("inductor", "fxgraph_cache_miss"),
    "aotautograd_hit": ("aot_autograd", "autograd_cache_hit"),
    "aotautograd_miss": ("aot_autograd", "autograd_cache_miss"),
}


def _counters() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters  # noqa: PLC0415
    except Exception:  # noqa: BLE001
        return {}
    return {name: int(counters[group][c]) for name, (group, c) in _COUNTERS.items()}


def cache_config_warnings() -> list[str]:
    """Settings under which the mega-cache records or reuses nothing."""
    out = []
    try:
        import torch._functorch.config as fconf  # noqa: PLC0415
        import torch._inductor.config as iconf  # noqa: PLC0415

        if iconf.force_disable_caches:
            out.append("torch.compiler.config.force_disable_caches is set: "
                       "compile artifacts are neither saved nor reused")
        if not iconf.fx_graph_cache:
            out.append("torch._inductor.config.fx_graph_cache is off (TORCHINDUCTOR_FX_GRAPH_CACHE=0?): "
                       "the artifact cache cannot help")
        if not fconf.enable_autograd_cache:
            out.append("torch._functorch.config.enable_autograd_cache is off: "
                       "AOTAutograd runs again on warm compiles")
    except Exception:  # noqa: BLE001
        pass
    return out


def _normalize_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _auto_key(model, inputs: tuple, mode: str, dynamic: bool) -> tuple[str, dict[str, Any]]:
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    device = tensors[0].device if tensors else next((p.device for p in model.parameters()), torch.device("cpu"))
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else repr(x) for x in inputs]
    dtype = ",".join(str(x.dtype).removeprefix("torch.") for x in tensors) or "none"
    digest, summary = architecture(model)
    extra = {**summary, "grad_enabled": torch.is_grad_enabled()}
    return cache_key(architecture=digest, input_shapes=shapes, dtype=dtype, mode=mode, device=str(device),
                     dynamic=dynamic, extra=extra)


def _check_materialized(model) -> None:
    if not isinstance(model, torch.nn.Module):
        return
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.device.type == "meta":
                raise ValueError(
                    f"compile_with_cache: {kind} {name!r} is still on the meta device; materialize the model "
                    "first (load_state_dict(..., assign=True), and initialize non-persistent buffers)")


# The bundle each key's compile recorded (or loaded) in this process, newest last. When Dynamo
# reuses code it compiled earlier in this process (same program, e.g. version 2 of a model after
# version 1), nothing reaches Inductor and the recording of this compile is empty: the bundle of
# that earlier compile is the right entry for the key, since the key names the program.
_RECORDED: OrderedDict[str, bytes] = OrderedDict()
_RECORDED_MAX = 8
_RECORDED_LOCK = threading.Lock()


def _remember(key: str, bundle: bytes) -> None:
    with _RECORDED_LOCK:
        _RECORDED[key] = bundle
        _RECORDED.move_to_end(key)
        while len(_RECORDED) > _RECORDED_MAX:
            _RECORDED.popitem(last=False)


def _recorded(key: str) -> bytes | None:
    with _RECORDED_LOCK:
        return _RECORDED.get(key)


def _sync(inputs: tuple) -> None:
    if any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in inputs):
        torch.cuda.synchronize()


def _first_call(model, inputs: tuple, mode: str, dynamic: bool) -> tuple[Callable, float]:
    t0 = time.perf_counter()
    compiled = torch.compile(model, mode=None if mode == "default" else mode, dynamic=dynamic)
    compiled(*inputs)
    _sync(inputs)
    return compiled, time.perf_counter() - t0


def _fetch(cache: ArtifactCache | None, report: CompileReport, components: dict[str, Any] | None) -> bytes | None:
    """The entry under ``report.key`` (timed into the report), or None with the miss reason recorded
    (a warning unless there simply was no entry)."""
    if cache is None or report.key is None:
        return None
    t0 = time.perf_counter()
    payload = cache.get(report.key, components=components)
    report.seconds_fetch = time.perf_counter() - t0
    if payload is None:
        report.miss_reason = cache.last_miss_reason
        if cache.last_error or report.miss_reason not in (None, "no entry"):
            report.warnings.append(f"compile cache miss, compiling cold: {report.miss_reason}")
    return payload


def compile_with_cache(
    model: Callable,
    example_inputs,
    cache: ArtifactCache | None,
    *,
    mode: str = "default",
    dynamic: bool = False,
    key: str | tuple[str, dict[str, Any]] | None = None,
    bundle_cpu_kernels: bool = True,
    warmup: Sequence[Any] = (),
) -> tuple[Callable, CompileReport]:
    """``torch.compile(model)`` and its first call on ``example_inputs``, with artifacts from
    ``cache`` when there is a valid entry (hit), else cold, storing the new artifacts (miss).
    For any callable; a served inference module goes through :func:`aot_compile_with_cache`,
    whose hit skips the tracing and lowering this one's still runs (and which falls back to this).

    Parameters:

    - ``model``: the module (eval/train mode and grad mode as it will run) or function to compile;
      a module built on the meta device must be materialized first (``load_state_dict(sd,
      assign=True)``; non-persistent buffers initialized), else ValueError.
    - ``example_inputs``: a tensor or a tuple of positional arguments for the first call; their
      shapes, dtypes and device are part of the key.
    - ``cache``: an :class:`ArtifactCache` (``LocalDirCache``, ``StorageCache``, ``RedisCache``),
      or None to compile without one.
    - ``mode``: ``torch.compile`` mode: ``"default"``, ``"reduce-overhead"``, ``"max-autotune"``…
    - ``dynamic``: ``torch.compile``'s ``dynamic`` flag (part of the key).
    - ``key``: None computes one (:func:`architecture` of the model, not its weight values; the
      inputs; ``mode``; ``dynamic``; grad mode; the device and software versions); a
      ``(key, components)`` pair from :func:`cache_key` is used as given; a bare string is used as
      the key, with the computed components still checked.
    - ``bundle_cpu_kernels``: on CPU, also store the C++ kernel binaries the mega-cache leaves out.
    - ``warmup``: more inputs (tensors or argument tuples) to call the compiled model on after the
      first call, *before* the artifacts are stored: graphs they compile (e.g. batch size 1, which
      Dynamo specializes even with ``dynamic=True``) go into the same entry, so a hit covers them too.

    Returns ``(compiled, report)``: the compiled callable (already called once) and a
    :class:`CompileReport`. Cache problems become ``report.warnings``; only errors of the compile
    itself propagate. Weights are inputs of the compiled program, so an entry stored for one
    version of a model serves every version with the same architecture, and ``compiled`` computes
    with ``model``'s own weights.

    Inductor's caches must be on (the defaults): ``cache_config_warnings()`` says when not. When
    Dynamo reuses code this process compiled earlier for the same key (version 2 after version 1),
    nothing is recorded by this compile; the entry stored on a miss is then the bundle that earlier
    compile recorded (or loaded)."""
    t_start = time.perf_counter()
    inputs = _normalize_inputs(example_inputs)
    _check_materialized(model)
    report = CompileReport(hit=False, key=None, seconds_compile_first_call=0.0, artifact_bytes=0, saved=False,
                           backend=cache.describe() if cache is not None else "none")
    report.warnings.extend(cache_config_warnings())

    components: dict[str, Any] | None = None
    if cache is not None:
        try:
            if isinstance(key, tuple):
                key_str, components = key
            else:
                key_str, components = _auto_key(model, inputs, mode, dynamic)
                if isinstance(key, str):
                    key_str = key
            report.key, report.components = _check_key(key_str), components
        except Exception as e:  # noqa: BLE001 - no key, no cache: still compile
            report.warnings.append(f"compile cache disabled: cannot compute the key ({_describe_error(e)})")
            cache = None

    is_cpu = (components or {}).get("device_type") == "cpu"
    root = _inductor_cache_dir()
    restored: list[str] = []

    payload = _fetch(cache, report, components)
    if payload is not None:
        t0 = time.perf_counter()
        try:
            mega, files = unpack_bundle(payload)
            if files and is_cpu:
                report.kernel_files = _restore_kernels(root, files)
                restored = list(files)
            info = torch.compiler.load_cache_artifacts(mega)
            if info is None:
                raise EntryError("torch.compiler.load_cache_artifacts could not read the artifacts")
            report.artifacts = {k: len(v) for k, v in info.artifacts.items()}
            report.hit, report.artifact_bytes = True, len(payload)
        except Exception as e:  # noqa: BLE001
            report.miss_reason = f"unusable entry ({_describe_error(e)})"
            report.warnings.append(f"compile cache entry not loaded, compiling cold: {report.miss_reason}")
        report.seconds_load = time.perf_counter() - t0

    before = _counters()
    collect_kernels = is_cpu and bundle_cpu_kernels
    kernel_keys_before = _cpp_cache_keys() if collect_kernels else set()
    files_before = _kernel_files(root) if collect_kernels else set()

    with _fresh_artifact_recording():
        if report.hit:
            try:
                compiled, report.seconds_compile_first_call = _first_call(model, inputs, mode, dynamic)
            except Exception as e:  # noqa: BLE001 - e.g. a restored kernel that will not load here
                report.warnings.append(
                    f"compile with cached artifacts failed ({_describe_error(e)}); compiled again cold "
                    "with Inductor's caches off")
                report.hit = False
                report.miss_reason = f"compile with cached artifacts failed ({_describe_error(e)})"
                for rel in restored:
                    (root / rel).unlink(missing_ok=True)
                torch._dynamo.reset()
                import torch._functorch.config as fconf  # noqa: PLC0415
                import torch._inductor.config as iconf  # noqa: PLC0415

                with iconf.patch(fx_graph_cache=False), fconf.patch(enable_autograd_cache=False):
                    compiled, report.seconds_compile_first_call = _first_call(model, inputs, mode, dynamic)
                cache = None  # do not store artifacts of a compile that bypassed the caches
        else:
            compiled, report.seconds_compile_first_call = _first_call(model, inputs, mode, dynamic)
        for w in warmup:  # recorded with the first call: one entry holds every graph they need
            w = _normalize_inputs(w)
            compiled(*w)
            _sync(w)

        after = _counters()
        report.inductor_cache = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        ic = report.inductor_cache
        cold_parts = [f"{n} {what}" for n, what in ((ic.get("fxgraph_miss", 0), "graph(s) cold in Inductor"),
                                                    (ic.get("aotautograd_miss", 0), "graph(s) cold in AOTAutograd"))
                      if n]
        refresh = report.hit and bool(cold_parts)
        if refresh:
            report.warnings.append(
                f"cache entry loaded but this compile still compiled {' and '.join(cold_parts)} (the entry does "
                "not fully match this program/environment); storing this compile's artifacts in its place")

        if cache is not None and report.key is not None and (refresh or not report.hit):
            t0 = time.perf_counter()
            bundle, files = None, {}
            try:
                saved = torch.compiler.save_cache_artifacts()
            except Exception as e:  # noqa: BLE001
                saved = None
                report.warnings.append(f"save_cache_artifacts failed: {_describe_error(e)}")
            if saved is not None:
                mega, info = saved
                report.artifacts = {k: len(v) for k, v in info.artifacts.items()}
                if collect_kernels:
                    new_keys = _cpp_cache_keys() - kernel_keys_before
                    rels = (_kernel_files(root) - files_before) | _files_for_keys(root, new_keys)
                    for rel in sorted(rels):
                        try:
                            files[rel] = (root / rel).read_bytes()
                        except OSError:
                            continue
                bundle = pack_bundle(mega, files)
                _remember(report.key, bundle)
            elif (bundle := _recorded(report.key)) is not None:
                # Dynamo reused what this process compiled for this key earlier: store that.
                try:
                    mega, files = unpack_bundle(bundle)
                    report.artifacts = {k: len(v) for k, v in _artifact_counts(mega).items()}
                except EntryError:
                    bundle = None
            if bundle is None:
                report.warnings.append(
                    "no compile artifacts to store: nothing reached Inductor in this call (Dynamo reused code "
                    "compiled earlier in this process outside compile_with_cache, or Inductor's caches are off)")
            else:
                cache.put(report.key, bundle, components=components)
                if cache.last_error:
                    report.warnings.append(f"compile artifacts not stored: {cache.last_error}")
                else:
                    report.saved, report.artifact_bytes, report.kernel_files = True, len(bundle), len(files)
            report.seconds_save = time.perf_counter() - t0
        elif report.hit and payload is not None:
            _remember(report.key, payload)  # type: ignore[arg-type]

    report.seconds_total = time.perf_counter() - t_start
    return compiled, report


# ---------------------------------------------------------------------------------------------
# AOTInductor packages: the serving compile path
# ---------------------------------------------------------------------------------------------

AOTI_FORMAT = "aoti-package-v1"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
# Inductor options of every package (part of the key). The weights stay out of the .so and are
# bound at load from the module (one copy; any version of the architecture). No tensor constant may
# be inlined into the code (Inductor inlines small ones by default: a bias of 4 values becomes
# literals) or folded (freezing): either would serve the compiling version's values to every later
# version. _aoti_package checks that each weight the program reads is still a bound constant.
_AOTI_CONFIGS: dict[str, Any] = {"aot_inductor.package_constants_in_so": False,
                                 "always_keep_tensor_constants": True, "freezing": False}


class _NoPackage(Exception):
    """This program cannot be an AOTInductor package (export or package build failed)."""


def _aoti_configs(mode: str, device: torch.device) -> tuple[dict[str, Any], list[str]]:
    """Inductor options for torch.compile ``mode`` in a package, and warnings. CUDA graphs
    (``reduce-overhead``, ``max-autotune``) are a torch.compile runtime feature a package has not."""
    from torch._inductor import list_mode_options  # noqa: PLC0415

    try:
        opts = dict(list_mode_options(mode or "default"))
    except Exception as e:  # noqa: BLE001 - torch raises a RuntimeError for an unknown mode
        raise ValueError(f"compile mode {mode!r}: {e}") from None
    warns = []
    if opts.pop("triton.cudagraphs", False) and device.type == "cuda":
        warns.append(f"compile mode {mode!r}: CUDA graphs are not used by an AOTInductor package")
    return {**opts, **_AOTI_CONFIGS}, warns


def _module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _tensor_spec(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype).removeprefix("torch."), list(t.stride()), str(t.device)]


def _bind_constants(fqns: list[str], spec: dict[str, list], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's tensors for the package's constants, checked against what it was built for
    (``load_constants`` checks neither names nor shapes: a missing one is a log line, a wrong shape
    is read out of bounds). Raises :class:`EntryError` with one line naming the differences."""
    problems = []
    for fqn in fqns:
        t = tensors.get(fqn)
        if t is None:
            problems.append(f"{fqn}: not a parameter or buffer of the module")
        elif fqn not in spec:
            problems.append(f"{fqn}: not described by the entry")
        elif _tensor_spec(t) != spec[fqn]:
            problems.append(f"{fqn}: module has {_tensor_spec(t)}, package was built for {spec[fqn]}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise EntryError("package constants do not match the module: " + "; ".join(problems[:3]) + more)
    return {fqn: tensors[fqn] for fqn in fqns}


class AOTIModule:
    """A loaded AOTInductor package with the module's weights bound (not copied: the module keeps
    ownership, and this object keeps the module alive). A package runs no guards, so each call
    checks what it was built for (batch range, the static dims, dtype, device) and makes the input
    contiguous: a 32x32 image into a package built for 28x28 would otherwise run, on wrong strides."""

    def __init__(self, loader: Any, module: torch.nn.Module, shape: tuple, dtype: torch.dtype,
                 device: torch.device, max_batch: int):
        from torch.utils import _pytree  # noqa: PLC0415

        self.loader, self.module = loader, module
        self.shape, self.dtype, self.device, self.max_batch = shape, dtype, device, max_batch
        self._unflatten = _pytree.tree_unflatten
        self._out_spec = _pytree.treespec_loads(loader.get_call_spec()[1])

    def bind(self, tensors: dict[str, torch.Tensor], spec: dict[str, list]) -> None:
        """Bind ``tensors`` (the module's, by name) as the package's constants, checked against
        ``spec`` (:func:`_bind_constants`); the package reads them in place."""
        constants = _bind_constants(list(self.loader.get_constant_fqns()), spec, tensors)
        # (constants, use_inactive, check_full_update, user_managed, allow_h2d_copy): as
        # torch.export.pt2_archive._package.AOTICompiledModel.load_constants calls it
        self.loader.load_constants(constants, False, True, True, False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (not isinstance(x, torch.Tensor) or x.dim() != len(self.shape) + 1 or not 1 <= x.shape[0] <= self.max_batch
                or any(want is not None and got != want for got, want in zip(x.shape[1:], self.shape))
                or x.dtype != self.dtype or x.device != self.device):
            got = f"{list(x.shape)} {x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
            want = ["1.." + str(self.max_batch), *("*" if s is None else s for s in self.shape)]
            raise ValueError(f"AOTInductor package takes {want} {self.dtype} on {self.device}, got {got}")
        return self._unflatten(self.loader.boxed_run([x.contiguous()]), self._out_spec)


def _load_package(path: str, device: torch.device) -> Any:
    """The package's C++ loader (``torch._inductor.aoti_load_package(path).loader``) without the
    public function's cost in a fresh process: it imports torch._inductor, Dynamo and torch.export
    (~1.2 s, more than the rest of a hit) to construct this same object. A torch without the
    binding takes the public way."""
    index = device.index if device.type == "cuda" and device.index is not None else -1
    loader_cls = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader_cls is None:
        from torch._inductor import aoti_load_package  # noqa: PLC0415

        return aoti_load_package(path, device_index=index).loader
    return loader_cls(path, "model", False, 1, index)


def _aoti_package(module: torch.nn.Module, example: torch.Tensor, max_batch: int, dynamic_dims: Sequence[int],
                  configs: dict[str, Any], report: CompileReport, workdir: str) -> tuple[Any, bytes, dict]:
    """Export and build the package; ``(loaded package, .pt2 bytes, constants spec)``. Any failure
    of the export or the build is :class:`_NoPackage` (the caller falls back to torch.compile)."""
    dims: dict[int, Any] = {d: torch.export.Dim.DYNAMIC for d in dynamic_dims}
    if max_batch > 1:
        dims[0] = torch.export.Dim("batch", min=1, max=max_batch)
        if example.shape[0] < 2:  # a size-1 example specializes the batch dim
            example = example[:1].expand(2, *example.shape[1:])
    example = example[:max_batch].contiguous()
    t0 = time.perf_counter()
    try:
        ep = torch.export.export(module, (example,), dynamic_shapes=(dims,) if dims else None)
    except Exception as e:  # noqa: BLE001 - data-dependent control flow, unsupported ops, ...
        raise _NoPackage(f"torch.export failed: {_describe_error(e).splitlines()[0]}") from None
    finally:
        report.seconds_export = time.perf_counter() - t0
    sig = ep.graph_signature
    weights = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    used = {n.name for n in ep.graph.nodes if n.op == "placeholder" and n.users}
    lifted = sorted(sig.inputs_to_lifted_tensor_constants[n] for n in used & set(sig.inputs_to_lifted_tensor_constants))
    if lifted:  # plain tensor attributes: no weights to bind them from, and not in the key
        raise _NoPackage(f"the program reads tensor attributes that are not parameters or buffers: {lifted[:3]}")
    path = os.path.join(workdir, "model.pt2")
    t0 = time.perf_counter()
    try:
        from torch._inductor import aoti_compile_and_package  # noqa: PLC0415

        aoti_compile_and_package(ep, package_path=path, inductor_configs=configs)
        pt2 = Path(path).read_bytes()
        loader = _load_package(path, example.device)
    except Exception as e:  # noqa: BLE001
        raise _NoPackage(f"AOTInductor build failed: {_describe_error(e).splitlines()[0]}") from None
    finally:
        report.seconds_compile_first_call = time.perf_counter() - t0
    fqns = list(loader.get_constant_fqns())
    baked = sorted({weights[n] for n in used if n in weights} - set(fqns))
    if baked:
        raise _NoPackage(f"Inductor built weights into the code ({baked[:3]}): the package would serve this "
                         "version's values for every version")
    tensors = _module_tensors(module)
    return loader, pt2, {f: _tensor_spec(tensors[f]) for f in fqns if f in tensors}


def _pack_aoti(pt2: bytes, meta: dict) -> bytes:
    m = json.dumps({"format": AOTI_FORMAT, **meta}, sort_keys=True).encode()
    return _BUNDLE_HEADER.pack(len(m)) + m + pt2


def _unpack_aoti(payload: bytes) -> tuple[dict, bytes]:
    try:
        (n,) = _BUNDLE_HEADER.unpack_from(payload)
        meta = json.loads(payload[_BUNDLE_HEADER.size:_BUNDLE_HEADER.size + n])
        pt2 = payload[_BUNDLE_HEADER.size + n:]
    except Exception as e:  # noqa: BLE001
        raise EntryError(f"malformed AOTI entry ({_describe_error(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != AOTI_FORMAT:
        raise EntryError(f"not an AOTI package entry (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta, pt2


def _input_signature(example: torch.Tensor, max_batch_size: int, dynamic_dims: Sequence[int]) -> tuple[int, tuple]:
    """``(max batch, shape past the batch dim with None for the dynamic dims)``, checked."""
    max_batch = int(max_batch_size)
    if max_batch < 1 or example.dim() < 1:
        raise ValueError(f"AOTI package: max_batch_size {max_batch} < 1 or a 0-dim example")
    dyn = {int(d) for d in dynamic_dims}
    if any(not 1 <= d < example.dim() for d in dyn):
        raise ValueError(f"dynamic_dims {sorted(dyn)}: indices of non-batch dims of a {example.dim()}-dim input")
    return max_batch, tuple(None if i + 1 in dyn else int(s) for i, s in enumerate(example.shape[1:]))


def aot_cache_key(module: torch.nn.Module, example: torch.Tensor, *, max_batch_size: int, mode: str = "default",
                  dynamic_dims: Sequence[int] = ()) -> tuple[str, dict[str, Any]]:
    """``(key, components)`` of the AOTInductor package :func:`aot_compile_with_cache` keeps for
    these arguments: :func:`cache_key` of the architecture (no weight values), the input shape past
    the batch dim (``"*"`` for ``dynamic_dims``), dtype, device, mode and the batch range, plus
    ``artifact: aoti-package-v1`` and the fixed package options, so it is never the key of a
    mega-cache entry of :func:`compile_with_cache`."""
    max_batch, static_shape = _input_signature(example, max_batch_size, dynamic_dims)
    # mode, not the Inductor options it maps to: those come from torch (its version is in the key),
    # and resolving them imports torch._inductor (~1 s), which a hit never needs
    digest, summary = architecture(module)
    extra = {**summary, "artifact": AOTI_FORMAT, "batch_range": [1, max_batch], "inductor_configs": _AOTI_CONFIGS}
    return cache_key(architecture=digest, input_shapes=[["batch", *("*" if s is None else s for s in static_shape)]],
                     dtype=str(example.dtype).removeprefix("torch."), mode=mode or "default",
                     device=str(example.device), dynamic=max_batch > 1, extra=extra)


def _answers_like(fn: Callable[[torch.Tensor], Any], module: torch.nn.Module, example: torch.Tensor,
                  max_batch: int) -> None:
    """Raise unless the compiled program answers as ``module`` does: at batch 1 the same output
    shape and values (within a tolerance that only a wrong program exceeds; the serving golden
    check is the strict one), and one output row per input row at ``max_batch``. Catches a
    package Inductor fixed to one batch size (it then reads past a smaller input) and an entry
    built for another program."""
    one = example[:1]
    got = fn(one)
    with torch.no_grad():
        want = module(one)
    if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor):
        if got.shape != want.shape:
            raise ValueError(f"outputs {list(got.shape)} for a batch of 1; the module gives {list(want.shape)}")
        tol = 1e-3 if want.dtype in (torch.float32, torch.float64) else 5e-2
        if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
            diff = float((got.float() - want.float()).abs().max())
            raise ValueError(f"outputs differ from the module's by up to {diff:.3g} (tolerance {tol:g})")
    if max_batch > 1:
        out = fn(one.expand(max_batch, *one.shape[1:]).contiguous())
        rows = out.shape[0] if isinstance(out, torch.Tensor) else max_batch
        if rows != max_batch:
            raise ValueError(f"{rows} output rows for a batch of {max_batch}")


def aot_compile_with_cache(
    module: torch.nn.Module,
    example: torch.Tensor,
    cache: ArtifactCache | None,
    *,
    max_batch_size: int,
    mode: str = "default",
    dynamic_dims: Sequence[int] = (),
    key: tuple[str, dict[str, Any]] | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], CompileReport]:
    """An AOTInductor package of ``module`` for one input ``[1..max_batch_size, *example.shape[1:]]``,
    from ``cache`` when there is a valid entry (hit), else exported, built and stored (miss).

    Why beside :func:`compile_with_cache`: a mega-cache hit still runs Dynamo tracing and graph
    lowering in the loading process; a package hit runs neither (fetch, write a temp file, dlopen,
    bind the weights: seconds, not minutes). A package needs a ``torch.export``-able inference
    module with one tensor input; anything else (graph breaks, data-dependent control flow,
    functions, training) is what :func:`compile_with_cache` is for, and where this function falls back.

    - ``module``: an eval-mode module on its device, materialized (not meta). Its parameters and
      buffers are bound to the package as they are (``user_managed``: no copy; the returned
      callable keeps ``module`` alive and computes with its current weights).
    - ``example``: one input; its shape past the batch dim, dtype and device are the package's.
    - ``max_batch_size``: the batch range ``1..max_batch_size`` one package serves (1: static).
    - ``mode``: torch.compile's modes mapped to Inductor options (``max-autotune`` →
      ``max_autotune`` + coordinate descent); CUDA graphs do not apply.
    - ``dynamic_dims``: further dims (indices into ``example.shape``) that may vary per call.
    - ``key``: a ``(key, components)`` pair to use instead of the computed one, which names the
      architecture (:func:`architecture`: not the weight values), the static input shape, dtype,
      batch range, mode, Inductor options, device and software versions, and ``artifact:
      aoti-package-v1`` (never the key of a mega-cache entry).

    Returns ``(callable, report)``; ``report.kind`` is ``"aoti"``, or ``"torch.compile"`` with
    ``fallback_reason`` and a warning when no package could be built (then the result is
    :func:`compile_with_cache`'s, ``dynamic=True`` and warmed on batch 1). A missing, corrupt,
    other-version or unloadable entry is a miss with ``miss_reason``; a failed store is a warning.
    Only a compile that fails both ways raises."""
    t_start = time.perf_counter()
    if not isinstance(module, torch.nn.Module) or not isinstance(example, torch.Tensor):
        raise TypeError("aot_compile_with_cache takes an nn.Module and one example tensor")
    _check_materialized(module)
    max_batch, static_shape = _input_signature(example, max_batch_size, dynamic_dims)
    dyn = [i + 1 for i, s in enumerate(static_shape) if s is None]
    report = CompileReport(hit=False, key=None, seconds_compile_first_call=0.0, artifact_bytes=0, saved=False,
                           backend=cache.describe() if cache is not None else "none", kind="aoti")
    components: dict[str, Any] | None = None
    if cache is not None:
        try:
            key_str, components = key if key is not None else aot_cache_key(
                module, example, max_batch_size=max_batch, mode=mode, dynamic_dims=dyn)
            report.key, report.components = _check_key(key_str), components
        except Exception as e:  # noqa: BLE001 - no key, no cache: still compile
            report.warnings.append(f"compile cache disabled: cannot compute the key ({_describe_error(e)})")
            cache = None

    def wrap(loader: Any) -> AOTIModule:
        return AOTIModule(loader, module, static_shape, example.dtype, example.device, max_batch)

    tensors = _module_tensors(module)
    workdir = tempfile.mkdtemp(prefix="forgeline-aoti-")  # 0700: the .so is loaded from here
    try:
        payload = _fetch(cache, report, components)
        if payload is not None:
            t0 = time.perf_counter()
            try:
                meta, pt2 = _unpack_aoti(payload)
                path = os.path.join(workdir, "model.pt2")
                Path(path).write_bytes(pt2)
                fn = wrap(_load_package(path, example.device))
                fn.bind(tensors, meta.get("constants") or {})
                _answers_like(fn, module, example, max_batch)  # here, or a miss: not on the first request
                _sync((example,))
                report.hit, report.artifact_bytes = True, len(payload)
            except Exception as e:  # noqa: BLE001 - an entry that does not load is a miss, never a crash
                report.miss_reason = f"unusable entry ({_describe_error(e).splitlines()[0]})"
                report.warnings.append(f"compile cache entry not loaded, compiling cold: {report.miss_reason}")
            report.seconds_load = time.perf_counter() - t0
        if report.hit:
            report.seconds_total = time.perf_counter() - t_start
            return fn, report

        configs, warns = _aoti_configs(mode, example.device)
        report.warnings.extend(warns)
        try:
            loader, pt2, spec = _aoti_package(module, example, max_batch, dyn, configs, report, workdir)
            t0 = time.perf_counter()
            try:
                fn = wrap(loader)
                fn.bind(tensors, spec)
                _answers_like(fn, module, example, max_batch)  # a package that does not is never stored
                _sync((example,))
            except Exception as e:  # noqa: BLE001 - nothing stored: the fallback serves
                raise _NoPackage(f"the new package did not run: {_describe_error(e).splitlines()[0]}") from None
            report.seconds_load = time.perf_counter() - t0
        except _NoPackage as e:
            return _fallback(module, example, cache, mode, max_batch, report, str(e), t_start)
        report.artifact_bytes = len(pt2)
        if cache is not None and report.key is not None:
            t0 = time.perf_counter()
            data = _pack_aoti(pt2, {"constants": spec, "batch_range": [1, max_batch]})
            cache.put(report.key, data, components=components)
            if cache.last_error:
                report.warnings.append(f"compile artifacts not stored: {cache.last_error}")
            else:
                report.saved, report.artifact_bytes = True, len(data)
            report.seconds_save = time.perf_counter() - t0
        report.seconds_total = time.perf_counter() - t_start
        return fn, report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # a loaded package keeps its own extracted copy


def _fallback(module, example, cache, mode, max_batch, report: CompileReport, reason: str, t_start: float):
    """torch.compile through :func:`compile_with_cache` when no package can be built: ``dynamic=True``
    (one program for every batch size) and warmed on batch 1, which Dynamo specializes even then, so
    the mega-cache entry holds that graph too. The warm-up tensor is a copy, like a request's: a
    graph traced on the view ``example[:1]`` guards on its base, and every request failed the guard."""
    example = example[:max_batch]
    warmup = [(example[:1].clone(),)] if example.shape[0] > 1 else []
    compiled, fb = compile_with_cache(module, (example,), cache, mode=mode, dynamic=True, warmup=warmup)
    fb.fallback_reason = reason
    fb.seconds_export = report.seconds_export
    fb.warnings[:0] = [*report.warnings, f"no AOTInductor package ({reason}); compiled with torch.compile instead"]
    fb.seconds_total = time.perf_counter() - t_start
    return compiled, fb


def _artifact_counts(mega: bytes) -> dict[str, list]:
    """Mega-cache entries by type, read without writing them anywhere (for the report)."""
    try:
        from torch.compiler._cache import CacheArtifactManager  # noqa: PLC0415

        return CacheArtifactManager.deserialize(mega) or {}
    except Exception:  # noqa: BLE001
        return {}


def configured(store: Storage | None = None, env=None) -> ArtifactCache:
    """The cache ``FORGELINE_COMPILE_CACHE`` names, for code outside a Dagster run (``forgeline
    serve``): ``local`` (:func:`pipeline.settings.compile_cache_dir`), ``storage`` (entries in
    ``store``, default the configured model store) or ``redis`` (``FORGELINE_COMPILE_CACHE_URL``).
    The compile-cache resources build the same caches inside runs."""
    from pipeline import settings

    kind, url = settings.compile_cache(env)
    if kind == "redis":
        return RedisCache(str(url))
    if kind == "storage":
        from pipeline.storage import configured as configured_store

        return StorageCache(store if store is not None else configured_store(env))
    return LocalDirCache(settings.compile_cache_dir(env))


__all__ = [
    "COMPILE_MODES",
    "AOTIModule",
    "ArtifactCache",
    "CompileReport",
    "EntryError",
    "LocalDirCache",
    "RedisCache",
    "StorageCache",
    "aot_cache_key",
    "aot_compile_with_cache",
    "architecture",
    "cache_config_warnings",
    "cache_key",
    "compile_with_cache",
    "configured",
    "device_components",
    "frame",
    "pack_bundle",
    "unframe",
    "unpack_bundle",
]
