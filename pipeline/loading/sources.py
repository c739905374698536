"""What to load: turning a source (a path, an ``s3://`` URI, ``<model>/<version>`` in a storage, or
a key in a storage) into its shards, and reading each shard's header and bytes.

A shard is either a local file (``path``: mmap / preadv) or an object read through the storage
interface with ranged reads pinned to the version seen at resolution (``stat().version``), so an
object replaced mid-load is an error, never a mix of two versions. No tensor bytes are read here
except through :meth:`Shard.read_into`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from pipeline.layout import DEFAULT_ROOT, FORMAT, INDEX_NAME, MANIFEST_NAME
from pipeline.loading.header import LoadError, TensorInfo, header_length, parse_header

if TYPE_CHECKING:
    from pipeline.storage import IntegrityError, Storage

# Imported where needed, not here: a fresh process that loads a local file (a serving cold start)
# pays for neither the export/promotion machinery nor the storage backends (tests/test_loading.py
# checks what `import pipeline.loading` imports); the names of a published version's files come
# from pipeline.layout, which imports nothing.


def _export():
    from pipeline import export

    return export


def _promotion():
    from pipeline import promotion

    return promotion

MiB = 1 << 20
_REMOTE_HEADER_PROBE = 64 * 1024  # first ranged read of a remote shard: the header usually fits
_PUBLISHED_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._+-]*)/([A-Za-z0-9][A-Za-z0-9._+-]*)$")
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# Parsed headers of local files a load verified, by sha256 (a re-load of the same model, e.g. a
# serving swap-in after an LRU eviction, skips the parse; ~0.3 ms of a ~2 ms small-model load).
_VERIFIED_HEADERS: OrderedDict[str, tuple[int | None, int, tuple, dict]] = OrderedDict()
_VERIFIED_HEADERS_KEEP = 1024


@dataclass
class Shard:
    """One safetensors file of a source, and what the loader learns about it."""

    display: str  # path or uri, for messages
    file: str  # file name, for expected_sha256 lookups
    path: str | None = None  # local filesystem path
    store: Storage | None = None  # else: read through this storage
    key: str | None = None
    sha256: str | None = None  # expected
    size: int | None = None  # expected (manifest), then actual
    names: list[str] | None = None  # tensors the index/manifest places here
    version: str | None = None  # remote reads are pinned to it (S3: ETag)
    head: bytes = b""  # a remote shard's first bytes, read with its size and version (reads within come from it)
    header_len: int = 0
    entries: list[TensorInfo] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    kind: str = ""  # tmpfs / local / network (probe), or the storage's kind (s3)
    cached: float | None = None

    # Remote bytes --------------------------------------------------------------------------
    def read(self, off: int, n: int) -> bytes:
        """``n`` bytes at ``off`` of a remote shard, from the pinned version."""
        if n <= 0:
            return b""
        if off + n <= len(self.head):
            return self.head[off : off + n]
        assert self.store is not None and self.key is not None
        from pipeline.storage import IntegrityError

        try:
            return self.store.read_range(self.key, off, n, version=self.version)
        except IntegrityError as e:
            raise self._changed(e) from None

    def read_into(self, off: int, out: Any) -> None:
        """Fill the writable buffer ``out`` with ``len(out)`` bytes at ``off`` of a remote shard
        (S3 pieces land in place as they arrive)."""
        view = memoryview(out).cast("B")
        if off + len(view) <= len(self.head):
            view[:] = self.head[off : off + len(view)]
            return
        assert self.store is not None and self.key is not None
        from pipeline.storage import IntegrityError

        try:
            self.store.read_into(self.key, off, out, version=self.version)
        except IntegrityError as e:
            raise self._changed(e) from None

    def _changed(self, e: IntegrityError) -> LoadError:
        from pipeline.storage import ObjectChanged

        if isinstance(e, ObjectChanged):
            return LoadError(self.display, f"object changed during load (ETag {self.version}): {e}")
        return LoadError(self.display, f"{e}: object truncated or changed during load")

    # Header --------------------------------------------------------------------------------
    def read_header(self, verified_as: str | None = None) -> None:
        """Read and validate the header (sets ``size``, ``header_len``, ``entries``, ``metadata``).
        ``verified_as``: the sha256 this load will check the file's bytes against; when a load in
        this process already verified a file with it, that file's header is taken instead of
        parsing this one (same sha256, same bytes: the check that follows fails the load if not)."""
        known = _VERIFIED_HEADERS.get(verified_as) if verified_as and self.path is not None else None
        if known is not None:
            try:
                size = os.stat(self.path).st_size
            except OSError as e:
                raise LoadError(self.display, f"cannot open: {e.strerror or e}") from None
            if self.size is not None and size != self.size:
                raise LoadError(self.display, f"{size} bytes on disk, the manifest says {self.size} "
                                              "(truncated or replaced)")
            if size == known[0]:
                self.size, self.header_len, self.entries, self.metadata = size, known[1], list(known[2]), dict(known[3])
                return
        if self.path is not None:  # parsed (also when the size is not the remembered file's)
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise LoadError(self.display, f"cannot open: {e.strerror or e}") from None
            try:
                size = os.fstat(fd).st_size
                if self.size is not None and size != self.size:
                    raise LoadError(self.display, f"{size} bytes on disk, the manifest says {self.size} "
                                                  "(truncated or replaced)")
                self.size = size
                self.header_len, self.entries, self.metadata = parse_header(fd, size, self.display)
            finally:
                os.close(fd)
            return
        size = self.size or 0
        first = self.read(0, min(max(_REMOTE_HEADER_PROBE, len(self.head)), size))
        n = header_length(first[:8], size, self.display)
        if 8 + n > len(first):
            first += self.read(len(first), 8 + n - len(first))
        self.header_len, self.entries, self.metadata = parse_header(first, size, self.display)

    def remember_verified(self, sha256: str) -> None:
        """This file's bytes hashed to ``sha256``: keep its parsed header for later loads."""
        if self.path is None or not self.entries:
            return
        _VERIFIED_HEADERS[sha256] = (self.size, self.header_len, tuple(self.entries), dict(self.metadata))
        _VERIFIED_HEADERS.move_to_end(sha256)
        while len(_VERIFIED_HEADERS) > _VERIFIED_HEADERS_KEEP:
            _VERIFIED_HEADERS.popitem(last=False)

    # sha256 --------------------------------------------------------------------------------
    def expected_sha256(self, expected: Mapping[str, str] | None) -> str | None:
        """The sha256 to check: from ``expected`` (by file name, path or key), else the manifest's."""
        if expected:
            for k in (self.file, self.display, self.path or "", self.key or ""):
                if k and k in expected:
                    return expected[k]
        return self.sha256

    def mismatch(self, got: str, want: str) -> LoadError:
        return LoadError(self.display, f"sha256 mismatch: the bytes hash to {got}, expected {want}")


@dataclass
class Source:
    display: str
    kind: str  # file / folder / index / published
    shards: list[Shard]
    quant: dict | None = None  # quantization metadata (manifest)
    complete: bool = True  # the shards are a whole model (strict dequantization)
    # resolved before load() was handed it (published_version, shm_tier.resolve_source): the time
    # that took (the requests that chose it, the shards' first reads), counted into the load's report
    seconds: float = 0.0

    def check_names(self) -> None:
        """Every tensor the index/manifest places in a shard is there, and no tensor is in two."""
        seen: dict[str, str] = {}
        for s in self.shards:
            have = {e.name for e in s.entries}
            if s.names is not None:
                missing = [n for n in s.names if n not in have]
                if missing:
                    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                    raise LoadError(s.display, f"tensor {missing[0]!r}{more} is placed in this shard by "
                                               f"{self.display} but the shard does not hold it")
                if self.kind == "published" and len(have) != len(s.names):
                    extra = sorted(have - set(s.names))
                    raise LoadError(s.display, f"holds tensors the manifest does not list: {extra[:3]}")
            for e in s.entries:
                if e.name in seen:
                    raise LoadError(s.display, f"tensor {e.name!r} is also in {seen[e.name]}")
                seen[e.name] = s.display


def hash_file(path: str, chunk: int = 8 * MiB) -> str:
    h = hashlib.sha256()
    mv = memoryview(bytearray(chunk))
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while (n := os.preadv(fd, [mv], off)) > 0:
            h.update(mv[:n])  # hashlib releases the GIL for large updates: shards hash in parallel
            off += n
    finally:
        os.close(fd)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


def resolve(source: Any, storage: Storage | None = None, *, allow_rejected: bool = False) -> Source:
    """Turn ``source`` into the list of shards to load (no tensor bytes are read).

    ``<model>/<ref>`` in ``storage``: ``ref`` is ``production`` (the promoted version, through the
    alias), ``latest`` (the newest complete, non-rejected version) or a version id
    (:func:`pipeline.promotion.resolve`). The version must be complete
    (:func:`pipeline.export.version_problem`, the one completeness test); a rejected version never
    loads as ``production``/``latest``, and by its id only with ``allow_rejected``. A published
    version found under a key or URI, or a local folder holding a manifest, follows the same rule.
    A :class:`Source` (from here or :func:`published_version`) is returned as it is."""
    if isinstance(source, Source):
        return source
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise LoadError(source, "source must be a path, an s3:// URI or <model>/<version>")
    if _URI_RE.match(source):
        from pipeline.storage import check_key, from_uri

        try:
            store, rel = from_uri(source, storage)
            if rel:
                check_key(rel)
        except ValueError as e:
            raise LoadError(source, str(e)) from None
        return _storage_source(store, rel, source, allow_rejected)
    m = _PUBLISHED_RE.match(source)
    if storage is not None and m and not os.path.exists(source):
        model, ref = m.groups()
        found = _published_source(storage, model, ref, allow_rejected)
        if found is not None:
            return found
    if os.path.exists(source):
        return _local_source(source, allow_rejected)
    if storage is not None:
        from pipeline.storage import check_key

        try:
            check_key(source.strip("/"))
        except ValueError:
            raise LoadError(source, "no such file or directory") from None
        return _storage_source(storage, source, allow_rejected=allow_rejected)
    raise LoadError(source, "no such file or directory (pass storage= for <model>/<version> or storage keys)")


def _published_source(storage: Storage, model: str, ref: str, allow_rejected: bool) -> Source | None:
    """``<model>/<ref>`` as a published version of ``storage``, or None when ``ref`` names no
    published version there (the caller then tries ``source`` as a storage key).

    ``storage`` may be a read view of a copy of the versions (the shm tier, a local cache:
    :class:`pipeline.shm_tier.TierView`) whose ``authority`` is the storage the copy came from:
    references and rejection are then the authority's (the copy has no alias, and its manifest
    predates a later rejection), ``pinned_refs`` (``{"<model>/<ref>": version}``) holds what the
    caller already resolved (so the version checked is the version read), and the copy must be
    complete too."""
    authority = getattr(storage, "authority", None) or storage
    what = f"{model}/{ref}"
    manifest, resolved_here = None, False  # resolved_here: the reference's manifest, checked, is the one read
    if ref in (_promotion().ALIAS, _promotion().LATEST):
        version = (getattr(storage, "pinned_refs", None) or {}).get(what)
        if version is None and ref == _promotion().LATEST and authority is storage:
            return latest_source(storage, model)
        if version is None:
            try:  # not rejected (latest: and complete), or the resolve fails
                version, resolved = _promotion().resolve_manifest(authority, model, ref, files=False)
            except (_export().ExportError, ValueError) as e:
                if ref == _promotion().LATEST:
                    raise LoadError(what, f"no published version of {model!r} in {authority.uri()} "
                                          "is complete and not rejected") from None
                raise LoadError(what, str(e).removeprefix(f"{what}: ")) from None
            if authority is storage:
                manifest, resolved_here = resolved, True
    else:
        version = ref
        if ref in _export().RESERVED_VERSIONS:
            raise LoadError(what, f"{ref!r} is a reference or a reserved name, not a version")
    display = f"{model}/{version}" if version == ref else f"{what} ({version})"
    if manifest is None:
        try:
            manifest = _export().read_manifest(storage, model, version)
        except _export().VersionNotFound as e:
            if version == ref and storage.list(what):
                return None  # not a version, but a key prefix in the storage
            raise LoadError(display, str(e) if version == ref else f"{version} is not in {storage.uri()}") from None
        except (_export().ExportError, ValueError) as e:
            raise LoadError(display, str(e)) from None
    prefix = _export().version_prefix(model, version)
    if authority is not storage:  # rejection is the authority's; the bytes are the copy's, which must be complete
        checked = (getattr(storage, "authority_manifests", None) or {}).get(version)
        _check_version(authority, model, version, display, allow_rejected, checked, files=False)
        problem = _export().version_problem(storage, model, version, allow_rejected=True, manifest=manifest)
        if problem is not None:
            raise LoadError(display, f"the copy in {storage.uri()} is not complete: {problem}")
        return _store_manifest_source(storage, prefix, manifest, display)
    # rejection: the production alias was refused if rejected; by id, allow_rejected decides
    return _store_manifest_source(storage, prefix, manifest, display, True if resolved_here else allow_rejected,
                                  published=(model, version))


def published_version(store: Storage, model: str, version: str, manifest: dict, *,
                      root: str = DEFAULT_ROOT, ref: str | None = None) -> Source:
    """The shards of the published ``model/version`` in ``store`` (under ``root``) from its
    ``manifest`` as the caller has just read it there: what ``resolve("<model>/<version>", store,
    allow_rejected=True)`` gives, without reading the manifest again. The version must be
    complete, as always. ``ref``: the reference the caller resolved to it (``production``), for
    messages (``model/production (version)``)."""
    t0 = time.perf_counter()
    display = f"{model}/{version}" if ref in (None, version) else f"{model}/{ref} ({version})"
    src = _store_manifest_source(store, _export().version_prefix(model, version, root), manifest,
                                 display, True, published=(model, version), root=root)
    src.seconds = time.perf_counter() - t0
    return src


def latest_source(storage: Storage, model: str, *,
                  copy: Callable[[str, dict], Source | None] | None = None) -> Source:
    """``<model>/latest``: the newest version that is not rejected and whose files are all there,
    found by reading it: the newest candidate's shards are read (and its other files stat-ed) at
    once, with no round of stats to choose it first; an incomplete one passes to the next newest.
    ``copy(version, manifest)``: the candidate's shards from a whole copy of it (the shm tier, a
    local cache; ``manifest``: the candidate's in ``storage``), or None to read it from ``storage``."""
    what, skipped = f"{model}/latest", []
    for version, manifest in _export().newest_manifests(storage, model):
        if manifest.get("rejected"):
            continue
        found = copy(version, manifest) if copy is not None else None
        if found is not None:
            return found
        try:
            return published_version(storage, model, version, manifest, ref="latest")
        except LoadError as e:  # a file missing, or of another size, or a malformed manifest
            skipped.append(f"{model}/{version}: {e.message}" if e.path == f"{what} ({version})" else str(e))
    why = f" ({'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''})" if skipped else ""
    raise LoadError(what, f"no published version of {model!r} in {storage.uri()} is complete and not rejected{why}")


def _check_version(store: Storage, model: str, version: str, display: str, allow_rejected: bool,
                   manifest: dict | None = None, **files: Any) -> None:
    """:func:`pipeline.export.version_problem` (``files``: its ``files``, ``known_sizes`` and
    ``root``) as a :class:`LoadError` (a rejected version names the way to load it anyway)."""
    problem = _export().version_problem(store, model, version, allow_rejected=allow_rejected, manifest=manifest,
                                        **files)
    if problem is None:
        return
    if not allow_rejected and _export().version_problem(store, model, version, allow_rejected=True,
                                                        manifest=manifest, **files) is None:
        problem += " (load it anyway with allow_rejected=True: forgeline load --allow-rejected)"
    raise LoadError(display, problem.removeprefix(f"{model}/{version}: "))  # display names the version


def _version_of_prefix(store: Storage, prefix: str, manifest: dict) -> tuple[str, str] | None:
    """``(model, version)`` when ``prefix`` is the published location of what ``manifest`` describes."""
    model, version = manifest.get("model"), manifest.get("version")
    try:
        if isinstance(model, str) and isinstance(version, str) and prefix.strip("/") == _export().version_prefix(model, version):
            return model, version
    except ValueError:
        pass
    return None


def _reject_check(display: str, manifest: dict, allow_rejected: bool) -> None:
    """A manifest read outside a storage (a local folder) that records a rejection is refused
    unless ``allow_rejected``."""
    rejected = manifest.get("rejected")
    if rejected and not allow_rejected:
        reason = rejected.get("reason") if isinstance(rejected, dict) else rejected
        raise LoadError(display, f"the manifest says this version is rejected: {reason} "
                                 "(load it anyway with allow_rejected=True: forgeline load --allow-rejected)")


def _read_json(display: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(display, f"not valid JSON: {e}") from None


def _is_manifest(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _index_shards(display: str, index: Any) -> list[tuple[str, list[str]]]:
    """[(shard file, tensor names)] of a HF-style index, in first-appearance order."""
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise LoadError(display, "index has no weight_map (tensor name -> shard file)")
    files: dict[str, list[str]] = {}
    for tname, file in wm.items():
        if not isinstance(file, str) or not file or file.startswith("/") or ".." in file.split("/"):
            raise LoadError(display, f"weight_map[{tname!r}] = {file!r} is not a relative file name")
        files.setdefault(file, []).append(tname)
    return list(files.items())


def _manifest_shards(display: str, manifest: Any) -> list[dict]:
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not shards:
        raise LoadError(display, "manifest lists no shards")
    for s in shards:
        if not isinstance(s, dict) or not isinstance(s.get("file"), str) or "/" in s["file"] or ".." in s["file"]:
            raise LoadError(display, f"manifest shard entry {s!r} is malformed")
    return shards


def _manifest_fields(s: dict) -> dict:
    """The Shard fields a manifest's shard entry gives."""
    return {"sha256": s.get("sha256"), "size": s.get("bytes"), "names": list(s.get("tensors") or []) or None}


def _quant_of(manifest: dict) -> dict | None:
    md = manifest.get("metadata") if isinstance(manifest, dict) else None
    q = md.get("quantization") if isinstance(md, dict) else None
    return q if isinstance(q, dict) else None


def _local_source(path: str, allow_rejected: bool = False) -> Source:
    p = Path(path)
    if p.is_dir():
        manifest = p / MANIFEST_NAME
        if manifest.is_file():
            m = _read_json(str(manifest), manifest.read_bytes())
            if _is_manifest(m):
                return _local_manifest_source(str(p), m, str(manifest), allow_rejected)
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if indexes:
            pick = p / INDEX_NAME if (p / INDEX_NAME) in indexes else indexes[0]
            if len(indexes) > 1 and pick != p / INDEX_NAME:
                raise LoadError(path, f"several index files ({', '.join(i.name for i in indexes)}); name one")
            return _local_index_source(str(pick))
        files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if not files:
            raise LoadError(path, "folder holds no manifest.json, no *.safetensors.index.json and no *.safetensors")
        return Source(path, "folder", [Shard(str(f), f.name, path=str(f)) for f in files])
    if not p.exists():
        raise LoadError(path, "no such file or directory")
    if p.name == MANIFEST_NAME:
        m = _read_json(path, p.read_bytes())
        if not _is_manifest(m):
            raise LoadError(path, f"not a {FORMAT} manifest")
        return _local_manifest_source(str(p.parent), m, path, allow_rejected)
    if p.name.endswith(".json"):
        return _local_index_source(path)
    return Source(path, "file", [Shard(path, p.name, path=path)], complete=False)


def _local_index_source(index_path: str) -> Source:
    p = Path(index_path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise LoadError(index_path, f"cannot read index: {e.strerror or e}") from None
    shards = []
    for file, names in _index_shards(index_path, _read_json(index_path, data)):
        sp = p.parent / file
        if not sp.is_file():
            raise LoadError(str(sp), f"shard {file!r} named by the index {index_path} is missing")
        shards.append(Shard(str(sp), file, path=str(sp), names=names))
    return Source(index_path, "index", shards)


def _local_manifest_source(folder: str, m: dict, display: str, allow_rejected: bool = False) -> Source:
    _reject_check(display, m, allow_rejected)
    shards = []
    for s in _manifest_shards(display, m):
        sp = Path(folder) / s["file"]
        if not sp.is_file():
            raise LoadError(str(sp), f"shard {s['file']!r} listed in {display} is missing")
        shards.append(Shard(str(sp), s["file"], path=str(sp), **_manifest_fields(s)))
    return Source(folder, "published", shards, quant=_quant_of(m))


def _store_shard(store: Storage, key: str, file: str, **kw: Any) -> Shard:
    """A shard inside a storage: a local path when the storage has one, else ranged reads pinned
    to the object's current version."""
    from pipeline.storage import ObjectNotFound
    from pipeline.storage.base import WHOLE_READ_BYTES

    display = store.uri(key)
    path = store.local_path(key)
    if path is not None:
        if not Path(path).is_file():
            raise LoadError(display, f"shard {file!r} is missing")
        return Shard(str(path), file, path=str(path), **kw)
    try:  # size, version and (usually) the whole header in one request; a small shard whole
        small = kw.get("size") is not None and kw["size"] <= WHOLE_READ_BYTES
        head, info = store.read_head(key, kw["size"] if small else _REMOTE_HEADER_PROBE)
    except ObjectNotFound:
        raise LoadError(display, f"shard {file!r} is missing") from None
    if kw.get("size") is not None and info.size != kw["size"]:
        raise LoadError(display, f"object has {info.size} bytes, the manifest says {kw['size']}")
    kw["size"] = info.size
    return Shard(display, file, store=store, key=key, version=info.version, kind=store.kind, head=head, **kw)


def _store_shards(store: Storage, specs: list[tuple[str, str, dict]]) -> list[Shard]:
    """:func:`_store_shard` for each ``(key, file, fields)``, in order; on a remote store the
    objects' first bytes are read (one GET each) in parallel."""
    from pipeline.storage import in_parallel

    return in_parallel(lambda spec: _store_shard(store, spec[0], spec[1], **spec[2]), specs, "forgeline-shard",
                       store.parallel_requests)


def _storage_source(store: Storage, key: str, display: str | None = None, allow_rejected: bool = False) -> Source:
    """A file, index, manifest or folder inside a storage."""
    from pipeline.storage import ObjectNotFound, join

    key = key.strip("/")
    display = display or store.uri(key)
    local = store.local_path(key) if key else None
    if local is not None and Path(local).exists():
        return _local_source(str(local), allow_rejected)
    base = key.rsplit("/", 1)[0] if "/" in key else ""
    if key.endswith(".json"):
        try:
            data = store.read(key)
        except ObjectNotFound:
            raise LoadError(display, "no such object") from None
        doc = _read_json(display, data)
        if key.rsplit("/", 1)[-1] == MANIFEST_NAME:
            if not _is_manifest(doc):
                raise LoadError(display, f"not a {FORMAT} manifest")
            return _store_manifest_source(store, base, doc, display, allow_rejected)
        shards = _store_shards(store, [(join(base, f), f, {"names": names}) for f, names in _index_shards(display, doc)])
        return Source(display, "index", shards)
    if key.endswith(".safetensors"):
        try:
            return Source(display, "file", [_store_shard(store, key, key.rsplit("/", 1)[-1])], complete=False)
        except LoadError:
            pass  # maybe a "folder" named *.safetensors; fall through
    try:
        objs = store.list(key) if key else store.list()
    except ValueError as e:
        raise LoadError(display, str(e)) from None
    children = {o.key[len(key) + 1 :] if key else o.key: o for o in objs}
    children = {n: o for n, o in children.items() if n and "/" not in n}
    if not children:
        raise LoadError(display, "no such object or prefix")
    if MANIFEST_NAME in children:
        doc = _read_json(display, store.read(join(key, MANIFEST_NAME)))
        if _is_manifest(doc):
            return _store_manifest_source(store, key, doc, display, allow_rejected)
    indexes = sorted(n for n in children if n.endswith(".safetensors.index.json"))
    if indexes:
        pick = INDEX_NAME if INDEX_NAME in indexes else indexes[0]
        if len(indexes) > 1 and pick != INDEX_NAME:
            raise LoadError(display, f"several index files ({', '.join(indexes)}); name one")
        return _storage_source(store, join(key, pick), allow_rejected=allow_rejected)
    files = sorted(n for n in children if n.endswith(".safetensors"))
    if not files:
        raise LoadError(display, "no manifest.json, *.safetensors.index.json or *.safetensors under this prefix")
    return Source(display, "folder", _store_shards(store, [(join(key, f), f, {}) for f in files]))


def _store_manifest_source(store: Storage, prefix: str, m: dict, display: str, allow_rejected: bool | None = None,
                           *, published: tuple[str, str] | None = None, root: str = DEFAULT_ROOT) -> Source:
    """The shards of the version ``m`` describes under ``prefix``. ``allow_rejected`` given (a
    manifest found under a key or URI, or a version by its id): a published location
    (``published``, under ``root``; else found from ``m``) is checked like ``<model>/<version>``
    (:func:`_check_version`), any other only for a recorded rejection. The rejection is checked
    first, from ``m`` alone; then the shards' first reads, which answer their sizes, and a stat of
    each other listed file (index, golden outputs) go out together: one round trip for the lot."""
    from pipeline.storage import StorageError, in_parallel, join

    check = allow_rejected is not None
    if check:
        published = published or _version_of_prefix(store, prefix, m)
        if published is not None:
            _check_version(store, *published, display, allow_rejected, m, files=False, root=root)
        else:
            _reject_check(display, m, allow_rejected)
    check = check and published is not None
    specs = [(join(prefix, s["file"]), s["file"], _manifest_fields(s)) for s in _manifest_shards(display, m)]
    # well-formed: the check above parsed the listing
    others = [f.file for f in _export().manifest_files(m)][len(specs):] if check else []

    def first_read(item: tuple | str) -> Shard | int | None:
        if isinstance(item, tuple):
            return _store_shard(store, item[0], item[1], **item[2])
        try:
            return store.stat(join(prefix, item)).size
        except StorageError:
            return None  # the check asks again and says why

    try:
        got = in_parallel(first_read, [*specs, *others], "forgeline-shard", store.parallel_requests)
    except LoadError:
        if check:  # a missing shard: said as the check says it
            _check_version(store, *published, display, True, m, root=root)
        raise
    shards = got[:len(specs)]
    if check:
        # sizes learned from the store: a remote shard's first read, the stats (a local shard: a stat)
        sizes = ({s.file: s.size for s in shards if s.path is None}
                 | {f: n for f, n in zip(others, got[len(specs):]) if n is not None})
        _check_version(store, *published, display, True, m, known_sizes=sizes, root=root)
    return Source(display, "published", shards, quant=_quant_of(m))


__all__ = ["Shard", "Source", "hash_file", "latest_source", "published_version", "resolve"]
