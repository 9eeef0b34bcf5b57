"""The zoo store: trained networks as WebDataset tar shards under a root folder.

Layout: ``<root>/<dataset>/<task>/<dataset>-<task>-<recipe>-<first seed>-<last seed>-<id>.tar``.
One sample per network, key ``<dataset>-<task>-<seed:06d>``, entries
``weights.safetensors`` (plain state dict), ``meta.json`` and optionally
``snapshots.safetensors`` (weights along training, ``epoch_<EEEE>/<name>``); no
other member is accepted. ``meta.json`` carries ``weights_sha256`` (and
``snapshots_sha256``), the SHA-256 of those bytes, so that a damaged or
differing copy of a network is recognised.

Rules that keep the store from ever losing a network:

- A shard is written under a hidden temporary name (``.<name>.partial``),
  flushed and fsynced, then linked to its final name without replacing any
  file, and the folder is fsynced. A file named ``*.tar`` (not hidden) is
  therefore always a finished shard; a process killed at any moment leaves at
  most a hidden ``.partial`` file, which nothing ever reads.
- Shards are never modified or deleted by MLDS (except ``quarantine``, which
  moves a corrupt shard aside into ``<root>/.quarantine/``). Writers only add
  files with unique names, so any number of sweeps can write into one store.
- Paths with a component starting with ``.`` (partials, ``.index``,
  ``.quarantine``) are never taken for shards.
- Reading checks the tar structure itself (Python's ``tarfile`` silently stops
  at a damaged header or a truncated file); any defect raises
  :class:`CorruptShardError` naming the file and the byte offset. So does every
  decoding failure of a hostile file: a member larger than its cap (read from
  the tar header before anything is read: ``MAX_META_BYTES``,
  ``MAX_WEIGHTS_BYTES``), a member that is not a plain file or not one MLDS
  writes, a ``meta.json`` that is not JSON, too deeply nested, or whose fields
  have the wrong types.
- Symbolic links inside the root are never followed (a linked file or folder
  is not a shard; :meth:`ZooStore.links` lists them) and never written
  through: the store's folders (``<dataset>/<task>``, ``.index``,
  ``.quarantine``, ``.failed``) are created one component at a time and a
  link among them raises :class:`LinkInStoreError`. The root itself may be a link.
- The index (:meth:`ZooStore.index`) is the one source of truth for what is
  stored: status, packaging and a resumed job all count the networks it lists.
  A shard enters the index only after every sample was checked, weights and
  snapshots against their SHA-256; the result is cached per shard in
  ``<root>/.index`` keyed on size and mtime, so a later change of a shard is
  seen, but bytes that rot in place while size and mtime stay are found only
  by ``index(verify=True)`` (``scripts/status.py --verify``), which reads
  every shard again.
- Networks that a job could not store (non-finite weights) are recorded in
  ``<root>/.failed/`` (:meth:`ZooStore.record_failure`), never as shards.

A network stored twice (two sweeps racing, or a rerun with a different
population split) is one network when both copies have the same recipe and
weights digest: :class:`Catalog` keeps it once and counts the extra copy as a
duplicate. Two *different* stored versions of one key are a conflict, reported
and never merged silently.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tarfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
PARTIAL_SUFFIX = ".partial"
WEIGHTS = "weights.safetensors"
META = "meta.json"
SNAPSHOTS = "snapshots.safetensors"
REQUIRED = (WEIGHTS, META)
MEMBERS = (WEIGHTS, META, SNAPSHOTS)
INDEX_DIR = ".index"
QUARANTINE_DIR = ".quarantine"
FAILED_DIR = ".failed"
INDEX_VERSION = 3  # 3: a shard is indexed only after its weights were checked against their digests
MAX_META_BYTES = 16 << 20  # a meta.json is a few kB; the cap is read from the tar header, before reading
MAX_WEIGHTS_BYTES = 1 << 30  # weights or snapshots of one network
MAX_HEADER_BYTES = 1 << 20  # pax / GNU long-name header data
_BLOCK = 512
_SHA256_HEX = frozenset("0123456789abcdef")


def sample_key(dataset: str, task: str, seed: int) -> str:
    """WebDataset key of one network: ``ds1-parity-000042`` (no dots)."""
    key = f"{dataset}-{task}-{int(seed):06d}"
    if "." in key or "/" in key or "-" in dataset or "-" in task:
        raise ValueError(f"dataset and task names may not contain '.', '/' or '-': {key!r}")
    return key


def parse_key(key: str) -> tuple[str, str, int]:
    """``(dataset, task, seed)`` of a sample key (inverse of :func:`sample_key`)."""
    try:
        dataset, rest = key.split("-", 1)
        task, seed = rest.rsplit("-", 1)
        return dataset, task, int(seed)
    except ValueError:
        raise ValueError(f"not a zoo sample key: {key!r}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Network:
    """One zoo sample: plain state dict and metadata; ``snapshots``: weights along training
    (``epoch_<EEEE>/<state-dict name>``), when stored and read."""

    key: str
    weights: dict[str, Tensor]
    meta: dict
    snapshots: dict[str, Tensor] | None = None


class LinkInStoreError(OSError):
    """A symbolic link where the store would create or write a file: MLDS never writes through links."""


class CorruptShardError(RuntimeError):
    """A shard that cannot be read completely; names the file and the byte offset of the defect."""

    def __init__(self, path: str | os.PathLike, offset: int, reason: str):
        self.path, self.offset, self.reason = str(path), int(offset), reason
        super().__init__(f"{path}: corrupt shard at byte offset {offset}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.offset, self.reason)


# --------------------------------------------------------------------------- writing

def encode(net: Network) -> dict:
    """WebDataset sample dict of a network (``meta.json`` gains ``weights_sha256``)."""
    weights = save_safetensors({k: v.detach().contiguous() for k, v in net.weights.items()})
    meta = {**net.meta, "weights_sha256": sha256_bytes(weights)}
    sample = {"__key__": net.key, WEIGHTS: weights}
    if net.snapshots:
        sample[SNAPSHOTS] = save_safetensors({k: v.detach().contiguous() for k, v in net.snapshots.items()})
        meta["snapshots_sha256"] = sha256_bytes(sample[SNAPSHOTS])
    sample[META] = json.dumps(meta, sort_keys=True).encode()
    return sample


def write_tar(path: Path, samples: Iterable[dict], mtime: float | None = None) -> int:
    """Write raw samples (``__key__`` plus bytes entries) to a new tar at ``path``, fsynced; returns the count.
    Fails if ``path`` exists."""
    count = 0
    mtime = int(time.time() if mtime is None else mtime)  # an integer mtime needs no pax header
    with open(path, "xb") as stream:
        with wds.TarWriter(stream, encoder=False, mtime=mtime) as writer:
            for sample in samples:
                writer.write(sample)
                count += 1
        stream.flush()
        os.fsync(stream.fileno())
    return count


def publish(partial: Path, final: Path) -> None:
    """Give a finished file its final name without ever replacing an existing file."""
    try:
        os.link(partial, final)  # atomic, and fails if ``final`` exists
    except FileExistsError:
        raise
    except OSError:  # file system without hard links
        if final.exists():
            raise FileExistsError(final) from None
        os.replace(partial, final)
    else:
        partial.unlink()
    _fsync_dir(final.parent)


class ZooStore:
    """Writes, lists and indexes the shards of a zoo root."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def task_dir(self, dataset: str, task: str) -> Path:
        return self.root / dataset / task

    def _walk(self, base: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
        """``os.walk`` of ``base`` that never follows a link (``base`` itself included, unless it is the root)."""
        rel = base.relative_to(self.root).parts if base != self.root else ()
        node = self.root
        for part in rel:  # a linked <dataset> or <task> folder is not part of the store
            node = node / part
            if node.is_symlink() or not node.is_dir():
                return
        if not base.is_dir():
            return
        for folder, dirs, files in os.walk(base, followlinks=False):
            yield Path(folder), dirs, files

    def shards(self, dataset: str | None = None, task: str | None = None) -> list[Path]:
        """Finished shards, sorted, optionally of one dataset (and task). Hidden paths are never shards;
        symbolic links (to files or folders) are never followed."""
        base = self.root / dataset if dataset else self.root
        if task:
            base = base / task
        found = []
        for folder, dirs, files in self._walk(base):
            dirs[:] = [d for d in dirs if not d.startswith(".") and not (folder / d).is_symlink()]
            found += [folder / f for f in files if f.endswith(SHARD_SUFFIX) and not f.startswith(".")
                      and not (folder / f).is_symlink() and (folder / f).is_file()]
        return sorted(found)

    def links(self) -> list[Path]:
        """Symbolic links inside the store (outside hidden folders): never followed, never counted."""
        found = []
        for folder, dirs, files in self._walk(self.root):
            found += [folder / n for n in [*dirs, *files] if not n.startswith(".") and (folder / n).is_symlink()]
            dirs[:] = [d for d in dirs if not d.startswith(".") and not (folder / d).is_symlink()]
        return sorted(found)

    def folder(self, *parts: str, create: bool = True) -> Path:
        """``<root>/<parts...>``, created one component at a time (``create``); a component that is a
        symbolic link or not a folder raises (:class:`LinkInStoreError`, ``NotADirectoryError``), so
        nothing is ever written through a link inside the store."""
        node = self.root
        if create:
            node.mkdir(parents=True, exist_ok=True)
        for part in parts:
            if not part or part in (".", "..") or "/" in part or os.sep in part:
                raise ValueError(f"not a folder name inside a store: {part!r}")
            node = node / part
            if node.is_symlink():
                raise LinkInStoreError(errno.ELOOP, "a symbolic link inside the zoo store (MLDS never writes "
                                       "through links; remove it or make it a real folder)", str(node))
            if create:
                try:
                    node.mkdir()
                except FileExistsError:
                    pass
                if node.is_symlink():  # made a link meanwhile
                    raise LinkInStoreError(errno.ELOOP, "a symbolic link inside the zoo store", str(node))
            if node.exists() and not node.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(node))
        return node

    def check_writable(self, dataset: str, task: str) -> Path:
        """Create the task's folder (no links) and a probe file in it, then remove the probe: raises
        ``OSError`` (read-only file system, permissions, a file or link in the way) before any work."""
        folder = self.folder(dataset, task)
        probe = folder / f".write-probe-{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}"
        try:
            with open(probe, "xb") as stream:
                stream.write(b"0")
                stream.flush()
                os.fsync(stream.fileno())
        finally:
            probe.unlink(missing_ok=True)
        return folder

    def write_shard(self, dataset: str, task: str, recipe: str, networks: list[Network]) -> Path:
        """Atomically write ``networks`` (of one task and recipe) as a new shard; returns its path."""
        if not networks:
            raise ValueError("no networks to write")
        seeds = [int(n.meta["seed"]) for n in networks]
        folder = self.folder(dataset, task)
        samples = [encode(n) for n in networks]
        while True:
            name = (f"{dataset}-{task}-{recipe}-{min(seeds):06d}-{max(seeds):06d}-"
                    f"{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}")
            final, partial = folder / name, folder / f".{name}{PARTIAL_SUFFIX}"
            if not final.exists() and not partial.exists():
                break
        try:
            write_tar(partial, samples)
            publish(partial, final)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return final

    def keys(self, dataset: str, task: str, recipe: str | None = None) -> set[str]:
        """Keys stored for a task (only those trained with ``recipe``, if given): exactly the networks
        of the index (:meth:`index`), which status and packaging count too.

        A corrupt shard is logged and its networks count as missing, so a
        resumed sweep trains them again.
        """
        indexes, corrupt = self.index(dataset, task=task)
        for err in corrupt:
            log.warning("ignoring corrupt shard (its networks count as missing): %s", err)
        return {e.key for index in indexes for e in index.entries
                if e.dataset == dataset and e.task == task and (not recipe or e.recipe == recipe)}

    # ----------------------------------------------------------------- index

    def index(self, dataset: str | None = None, verify: bool = False, cache: bool = True, task: str | None = None
              ) -> tuple[list[ShardIndex], list[CorruptShardError]]:
        """Index of every finished shard (of ``dataset``, ``task``): ``(sound shards, errors of corrupt ones)``.

        A shard is indexed only when all of it is sound: tar structure, every
        ``meta.json``, every weights (and snapshots) file against its SHA-256.
        Results are cached in ``<root>/.index/`` per shard (keyed on size and
        mtime; a shard is never modified after it is written), so a later call
        reads only new or changed shards. ``verify`` ignores the cache and reads
        every shard again (bytes that changed in place, size and mtime kept).
        """
        good, bad = [], []
        for shard in self.shards(dataset, task):
            try:
                good.append(self._index_one(shard, verify, cache))
            except CorruptShardError as err:
                bad.append(err)
        return good, bad

    def _cache_file(self, shard: Path) -> Path:
        return self.root / INDEX_DIR / (str(shard.relative_to(self.root)) + ".json")

    def _index_one(self, shard: Path, verify: bool, cache: bool) -> ShardIndex:
        try:
            stat = shard.stat()
        except OSError as err:
            raise CorruptShardError(shard, 0, f"cannot open: {err}") from err
        cache_file = self._cache_file(shard)
        if cache and not verify and not _links_between(self.root, cache_file) and not cache_file.is_symlink():
            try:
                data = json.loads(cache_file.read_text())
                if (data.get("version") == INDEX_VERSION and data["size"] == stat.st_size
                        and data["mtime_ns"] == stat.st_mtime_ns):
                    return ShardIndex(shard, stat.st_size, [Entry(shard=str(shard), **e) for e in data["entries"]])
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                pass
        index = scan_shard(shard, verify=True)
        if cache:
            entries = [{k: v for k, v in asdict(e).items() if k != "shard"} for e in index.entries]
            blob = json.dumps({"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                               "entries": entries}, sort_keys=True)
            tmp = None
            try:  # best effort: a read-only or full store simply stays uncached, and leaves nothing behind
                rel = cache_file.relative_to(self.root).parts
                folder = self.folder(*rel[:-1])
                tmp = folder / f".{cache_file.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}"
                with open(tmp, "x") as stream:
                    stream.write(blob)
                os.replace(tmp, folder / rel[-1])
            except OSError as err:
                if isinstance(err, LinkInStoreError):
                    log.warning("index not cached: %s", err)
                if tmp is not None:
                    try:
                        tmp.unlink(missing_ok=True)
                    except OSError:
                        pass
        return index

    # ----------------------------------------------------------------- housekeeping

    def partials(self, min_age_s: float = 0.0) -> list[Path]:
        """Hidden ``.partial`` files left by writers (killed ones, or ones still running when young);
        links are not followed."""
        now = time.time()
        out = []
        for folder, dirs, files in self._walk(self.root):
            dirs[:] = [d for d in dirs if not (folder / d).is_symlink()]
            for name in files:
                p = folder / name
                if not (name.startswith(".") and name.endswith(PARTIAL_SUFFIX)) or p.is_symlink():
                    continue
                try:
                    if now - p.stat().st_mtime >= min_age_s:
                        out.append(p)
                except FileNotFoundError:  # finished meanwhile
                    pass
        return sorted(out)

    def remove_partials(self, min_age_s: float = 3600.0) -> list[Path]:
        """Delete ``.partial`` files untouched for ``min_age_s`` (never a finished shard)."""
        removed = []
        for p in self.partials(min_age_s):
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def quarantine(self, shard: str | os.PathLike) -> Path:
        """Move a (corrupt) shard to ``<root>/.quarantine/<same relative path>``; its networks count as
        missing. Never replaces a file there (a name taken gets a ``.<n>`` suffix), never writes through
        a link."""
        shard = Path(shard)
        rel = shard.relative_to(self.root).parts
        if shard.is_symlink() or _links_between(self.root, shard):
            raise LinkInStoreError(errno.ELOOP, "not a shard of the store (a symbolic link)", str(shard))
        folder = self.folder(QUARANTINE_DIR, *rel[:-1])
        for n in range(1000):
            target = folder / (rel[-1] if n == 0 else f"{rel[-1]}.{n}")
            try:
                publish(shard, target)
            except FileExistsError:
                continue
            return target
        raise FileExistsError(errno.EEXIST, "no free name in the quarantine", str(folder / rel[-1]))

    # ----------------------------------------------------------------- failed networks

    def record_failure(self, dataset: str, task: str, recipe: str, seed: int, reason: str, meta: dict) -> Path:
        """Record that network ``seed`` of ``recipe`` was trained but not stored (e.g. non-finite
        weights): ``<root>/.failed/<dataset>/<task>/<key>-<recipe>.json`` (replaced by a later failure
        of the same network; never a shard). A rerun trains it again."""
        key = sample_key(dataset, task, seed)
        folder = self.folder(FAILED_DIR, dataset, task)
        record = {"key": key, "dataset": dataset, "task": task, "seed": int(seed), "recipe": recipe,
                  "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "meta": meta}
        final = folder / f"{key}-{recipe}.json"
        tmp = folder / f".{final.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}"
        try:
            with open(tmp, "x") as stream:
                json.dump(record, stream, sort_keys=True, default=str)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def failures(self, dataset: str | None = None) -> list[dict]:
        """Failure records (:meth:`record_failure`), sorted by key; unreadable ones are skipped."""
        base = self.root / FAILED_DIR
        if _links_between(self.root, base) or not base.is_dir() or base.is_symlink():
            return []
        out = []
        for folder, dirs, files in os.walk(base, followlinks=False):
            for name in sorted(files):
                p = Path(folder) / name
                if name.startswith(".") or not name.endswith(".json") or p.is_symlink():
                    continue
                try:
                    if p.stat().st_size > MAX_META_BYTES:
                        continue
                    record = json.loads(p.read_text())
                except (OSError, ValueError, RecursionError):
                    continue
                if isinstance(record, dict) and isinstance(record.get("key"), str) \
                        and (dataset is None or record.get("dataset") == dataset):
                    out.append(record)
        return sorted(out, key=lambda r: (r["key"], str(r.get("recipe"))))


# --------------------------------------------------------------------------- reading

@dataclass
class Entry:
    """One stored copy of a network, as indexed (no weights): where it is and what it is."""

    key: str
    dataset: str
    task: str
    seed: int
    recipe: str
    converged: bool
    epochs: int | None
    weights_sha256: str
    weights_offset: int
    weights_size: int
    meta_offset: int
    meta_size: int
    metrics: dict = field(default_factory=dict)
    shard: str = ""
    source: str | None = None  # image source of a DS4 network (meta.json input.source)
    snapshot_epochs: list[int] = field(default_factory=list)  # epochs in snapshots.safetensors
    snapshots_offset: int | None = None
    snapshots_size: int | None = None

    @property
    def identity(self) -> tuple[str, str]:
        """Two copies with equal identity are the same network."""
        return self.recipe, self.weights_sha256


@dataclass
class ShardIndex:
    path: Path
    size: int
    entries: list[Entry]


class _Oversized(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


class _CappedReader:
    """The file as ``tarfile`` sees it in :func:`walk_shard`: it reads headers only (member data is
    never read there), so a read beyond ``MAX_HEADER_BYTES`` is an extended header (pax, GNU long
    name, chained or not) that declares a hostile size, refused before it is read into memory."""

    def __init__(self, raw):
        self.raw = raw

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > MAX_HEADER_BYTES:
            raise _Oversized(size)
        return self.raw.read(size)

    def seek(self, *args):
        return self.raw.seek(*args)

    def tell(self) -> int:
        return self.raw.tell()


def member_limit(ext: str) -> int:
    """The most bytes a sample member may have (checked from the tar header, before reading)."""
    return MAX_META_BYTES if ext == META else MAX_WEIGHTS_BYTES


def walk_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """Samples of a shard from its tar headers: ``(key, {entry: (data offset, size)})``, in file order.

    Checks what ``tarfile`` lets pass: every member's data lies inside the file,
    names are ``<key>.<entry>``, entries are those MLDS writes, each member is a
    plain file no larger than its cap (:func:`member_limit`), a key's members
    are contiguous, and the archive ends with its end-of-archive blocks (a
    damaged header or a truncated file would otherwise look like a shorter,
    valid archive). Nothing is read beyond the headers.
    """
    path = str(path)
    try:
        size = os.path.getsize(path)
        stream = open(path, "rb")
    except OSError as err:
        raise CorruptShardError(path, 0, f"cannot open: {err}") from err
    with stream:
        try:
            tar = tarfile.open(fileobj=_CappedReader(stream), mode="r:")
        except _Oversized as err:
            raise CorruptShardError(path, 0, f"an extended tar header declares {err.size} bytes (at most "
                                    f"{MAX_HEADER_BYTES} are read)") from None
        except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError) as err:
            raise CorruptShardError(path, 0, f"not a tar archive ({err})") from err
        seen: set[str] = set()
        key, members = None, {}
        while True:
            try:
                info = tar.next()
            except _Oversized as err:
                raise CorruptShardError(path, tar.offset, f"an extended tar header declares {err.size} bytes "
                                        f"(at most {MAX_HEADER_BYTES} are read)") from None
            except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError) as err:
                raise CorruptShardError(path, tar.offset, f"invalid tar header ({err})") from err
            if info is None:
                break
            tar.members = []  # keep memory flat on large shards
            if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse is not None:
                raise CorruptShardError(path, info.offset, f"unexpected tar member {info.name!r} (not a plain file)")
            if info.offset_data + info.size > size:
                raise CorruptShardError(path, info.offset_data,
                                        f"truncated: {info.name} needs bytes up to {info.offset_data + info.size}, "
                                        f"the file has {size}")
            name = info.name
            member_key, dot, ext = name.partition(".")
            if not dot or not member_key or "/" in name:
                raise CorruptShardError(path, info.offset, f"unexpected tar member name {name!r}")
            if info.size > member_limit(ext):
                raise CorruptShardError(path, info.offset_data, f"{name} declares {info.size} bytes, more than "
                                        f"the {member_limit(ext)} a {ext} may have")
            if member_key != key:
                if key is not None:
                    _check_members(path, key, members)
                    yield key, members
                if member_key in seen:
                    raise CorruptShardError(path, info.offset, f"members of {member_key} are not contiguous")
                seen.add(member_key)
                key, members = member_key, {}
            if ext in members:
                raise CorruptShardError(path, info.offset, f"{name} occurs twice")
            members[ext] = (info.offset_data, info.size)
        end = tar.offset
        stream.seek(end)
        tail = stream.read(2 * _BLOCK)
        if tail != b"\0" * (2 * _BLOCK):
            if len(tail) < 2 * _BLOCK and not tail.strip(b"\0"):
                reason = f"truncated: the file ends at byte {size} before the end-of-archive marker"
            elif end >= size:
                reason = f"truncated: the file ends at byte {size}, where a tar header or end-of-archive should be"
            else:
                reason = "invalid tar header (bad checksum or garbage where a header should be)"
            raise CorruptShardError(path, end, reason)
        if key is not None:  # the last sample only once the archive is known to be complete
            _check_members(path, key, members)
            yield key, members


def _check_members(path: str, key: str, members: dict) -> None:
    unknown = sorted(e for e in members if e not in MEMBERS)
    if unknown:
        raise CorruptShardError(path, members[unknown[0]][0], f"sample {key} has members MLDS does not write: "
                                f"{', '.join(unknown)} (a sample holds {', '.join(MEMBERS)})")


def shard_keys(shard: str | os.PathLike) -> list[str]:
    """Keys of the samples in a shard, from its tar headers (structure checked)."""
    return sorted(key for key, _ in walk_shard(shard))


def _read_at(stream, path: str, offset: int, size: int, what: str) -> bytes:
    stream.seek(offset)
    data = stream.read(size)
    if len(data) != size:
        raise CorruptShardError(path, offset + len(data), f"truncated inside {what}")
    return data


def _check_sample(path: str, key: str, members: dict) -> None:
    missing = [e for e in REQUIRED if e not in members]
    if missing:
        offset = min(o for o, _ in members.values()) if members else 0
        raise CorruptShardError(path, offset, f"sample {key} lacks {', '.join(missing)}")
    unknown = sorted(e for e in members if e not in MEMBERS)
    if unknown:
        raise CorruptShardError(path, members[unknown[0]][0], f"sample {key} has members MLDS does not write: "
                                f"{', '.join(unknown)} (a sample holds {', '.join(MEMBERS)})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _SHA256_HEX


def meta_problem(meta: dict) -> str | None:
    """What is wrong with the fields of a ``meta.json`` that the index and the readers use (their
    types), or None."""
    for name in ("dataset", "task"):
        if not isinstance(meta.get(name), str):
            return f"{name} is not a string"
    if not _is_int(meta.get("seed")):
        return "seed is not an integer"
    checks = {"recipe": lambda v: isinstance(v, str), "converged": lambda v: isinstance(v, bool),
              "epochs": _is_int, "weights_sha256": _is_digest, "snapshots_sha256": _is_digest,
              "architecture": lambda v: isinstance(v, dict), "input": lambda v: isinstance(v, dict),
              "snapshots": lambda v: isinstance(v, list) and all(_is_int(e) for e in v),
              "metrics": lambda v: isinstance(v, dict) and all(
                  isinstance(m, dict) and all(x is None or _is_number(x) for x in m.values()) for m in v.values())}
    for name, ok in checks.items():
        if meta.get(name) is not None and not ok(meta[name]):
            return f"{name} has the wrong type"
    source = (meta.get("input") or {}).get("source")
    if source is not None and not isinstance(source, str):
        return "input.source is not a string"
    return None


def parse_meta(path: str, key: str, offset: int, data: bytes) -> dict:
    """``meta.json`` bytes of sample ``key``, parsed and checked against the key and for the types of
    the fields MLDS reads; any failure is a :class:`CorruptShardError`."""
    if len(data) > MAX_META_BYTES:
        raise CorruptShardError(path, offset, f"meta.json of {key} has {len(data)} bytes, more than {MAX_META_BYTES}")
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, too deeply nested, an integer too long
        raise CorruptShardError(path, offset, f"meta.json of {key} is not valid JSON "
                                f"({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(meta, dict):
        raise CorruptShardError(path, offset, f"meta.json of {key} is not an object")
    try:
        expected = parse_key(key)
    except ValueError as err:
        raise CorruptShardError(path, offset, str(err)[:300]) from None
    if any(name not in meta for name in ("dataset", "task", "seed")):
        raise CorruptShardError(path, offset, f"meta.json of {key} lacks dataset/task/seed")
    problem = meta_problem(meta)
    if problem:
        raise CorruptShardError(path, offset, f"meta.json of {key}: {problem}")
    found = (meta["dataset"], meta["task"], meta["seed"])
    if found != expected:
        raise CorruptShardError(path, offset, f"meta.json of {key} describes {found}, not the key {expected}")
    return meta


def check_weights(path: str, key: str, offset: int, data: bytes, meta: dict, member: str = WEIGHTS
                  ) -> dict[str, Tensor]:
    """Weights bytes (``member``: weights or snapshots) of ``key`` checked against their digest in
    ``meta.json`` and parsed (safetensors: never unpickles)."""
    what = "weights" if member == WEIGHTS else "snapshots"
    digest = meta.get(f"{what}_sha256")
    if (digest is not None or member != WEIGHTS) and sha256_bytes(data) != digest:
        raise CorruptShardError(path, offset, f"{what} of {key} do not match their SHA-256 in meta.json")
    return parse_safetensors(path, key, offset, data, what)


def parse_safetensors(path: str, key: str, offset: int, data: bytes, what: str = "weights") -> dict[str, Tensor]:
    """Tensors of a safetensors file (never unpickles); any failure is a :class:`CorruptShardError`."""
    try:
        return load_safetensors(data)
    except Exception as err:  # SafetensorError, or anything else a hostile file provokes: a corrupt shard
        raise CorruptShardError(path, offset, f"{what} of {key} are not a valid safetensors file "
                                f"({type(err).__name__}: {str(err)[:200]})") from None


def _checked_samples(path: str, stream) -> Iterator[tuple[str, dict, dict[str, tuple[int, int]]]]:
    """``(key, meta, {member: (offset, size)})`` of each sample of an open shard, in file order,
    with the tar structure and ``meta.json`` checked."""
    for key, members in walk_shard(path):
        _check_sample(path, key, members)
        meta_offset, meta_size = members[META]
        meta = parse_meta(path, key, meta_offset, _read_at(stream, path, meta_offset, meta_size, f"{key}.{META}"))
        if (SNAPSHOTS in members) != ("snapshots_sha256" in meta):
            raise CorruptShardError(path, meta_offset, f"{key}: snapshots.safetensors and meta.json's "
                                    "snapshots_sha256 must come together")
        yield key, meta, members


def scan_shard(shard: str | os.PathLike, verify: bool = False) -> ShardIndex:
    """Index of one shard: its tar structure and every ``meta.json`` checked; with ``verify`` every
    weights file too. Raises :class:`CorruptShardError` on the first defect."""
    path = str(shard)
    entries = []
    with open(path, "rb") as stream:
        for key, meta, members in _checked_samples(path, stream):
            (w_offset, w_size), (meta_offset, meta_size) = members[WEIGHTS], members[META]
            s_offset, s_size = members.get(SNAPSHOTS, (None, None))
            digest = meta.get("weights_sha256")
            if verify or digest is None:  # shards written before digests existed: compute it
                data = _read_at(stream, path, w_offset, w_size, f"{key}.{WEIGHTS}")
                if verify:
                    check_weights(path, key, w_offset, data, meta)
                digest = digest or sha256_bytes(data)
            if verify and s_offset is not None:
                check_weights(path, key, s_offset, _read_at(stream, path, s_offset, s_size, f"{key}.{SNAPSHOTS}"),
                              meta, SNAPSHOTS)
            entries.append(Entry(key=key, dataset=meta["dataset"], task=meta["task"], seed=int(meta["seed"]),
                                 recipe=str(meta.get("recipe", "")), converged=bool(meta.get("converged", False)),
                                 epochs=meta.get("epochs"), weights_sha256=digest, weights_offset=w_offset,
                                 weights_size=w_size, meta_offset=meta_offset, meta_size=meta_size,
                                 metrics=meta.get("metrics") or {}, shard=path,
                                 source=(meta.get("input") or {}).get("source"),
                                 snapshot_epochs=list(meta.get("snapshots") or []), snapshots_offset=s_offset,
                                 snapshots_size=s_size))
    return ShardIndex(Path(path), os.path.getsize(path), entries)


def read_raw(entry: Entry, stream=None, snapshots: bool = False) -> tuple[bytes, bytes, bytes | None]:
    """``(weights bytes, meta bytes, snapshots bytes or None)`` of an indexed copy, weights checked
    against their digest; the snapshots are read (and checked) only when asked for."""
    own = stream is None
    stream = stream or open(entry.shard, "rb")
    try:
        meta_bytes = _read_at(stream, entry.shard, entry.meta_offset, entry.meta_size, f"{entry.key}.{META}")
        weights = _read_at(stream, entry.shard, entry.weights_offset, entry.weights_size, f"{entry.key}.{WEIGHTS}")
        snaps = None
        if snapshots and entry.snapshots_offset is not None:
            snaps = _read_at(stream, entry.shard, entry.snapshots_offset, entry.snapshots_size,
                             f"{entry.key}.{SNAPSHOTS}")
    finally:
        if own:
            stream.close()
    meta = parse_meta(entry.shard, entry.key, entry.meta_offset, meta_bytes)
    if sha256_bytes(weights) != entry.weights_sha256 or meta.get("weights_sha256", entry.weights_sha256) != entry.weights_sha256:
        raise CorruptShardError(entry.shard, entry.weights_offset,
                                f"weights of {entry.key} do not match their SHA-256 (changed since indexed?)")
    if snaps is not None and sha256_bytes(snaps) != meta.get("snapshots_sha256"):
        raise CorruptShardError(entry.shard, entry.snapshots_offset,
                                f"snapshots of {entry.key} do not match their SHA-256 in meta.json")
    return weights, meta_bytes, snaps


def read_entry(entry: Entry, stream=None, snapshots: bool = False) -> Network:
    """The network of an indexed copy (checked); with ``snapshots``, its weights along training too."""
    weights, meta_bytes, snaps = read_raw(entry, stream, snapshots)
    meta = parse_meta(entry.shard, entry.key, entry.meta_offset, meta_bytes)
    return Network(entry.key, check_weights(entry.shard, entry.key, entry.weights_offset, weights, meta), meta,
                   None if snaps is None else check_weights(entry.shard, entry.key, entry.snapshots_offset, snaps,
                                                            meta, SNAPSHOTS))


def read_shard(shard: str | os.PathLike, verify: bool = True) -> Iterator[Network]:
    """The networks of one shard in file order, each checked (structure, meta, weights digest; with
    ``verify`` also the snapshots' digest, whose tensors are not loaded).

    Samples before a defect are yielded; the defect raises :class:`CorruptShardError`.
    """
    path = str(shard)
    with open(path, "rb") as stream:
        for key, meta, members in _checked_samples(path, stream):
            w_offset, w_size = members[WEIGHTS]
            data = _read_at(stream, path, w_offset, w_size, f"{key}.{WEIGHTS}")
            weights = check_weights(path, key, w_offset, data, meta) if verify else parse_safetensors(path, key,
                                                                                                   w_offset, data)
            if verify and SNAPSHOTS in members:
                s_offset, s_size = members[SNAPSHOTS]
                check_weights(path, key, s_offset, _read_at(stream, path, s_offset, s_size, f"{key}.{SNAPSHOTS}"),
                              meta, SNAPSHOTS)
            yield Network(key, weights, meta)


def decode(sample: dict) -> Network:
    """Network of a raw WebDataset sample (bytes entries); checks the weights digest. Never unpickles."""
    source = sample.get("__url__", "<sample>")
    key = sample["__key__"]
    missing = [e for e in REQUIRED if e not in sample]
    if missing:
        raise CorruptShardError(source, -1, f"sample {key} lacks {', '.join(missing)}")
    unknown = sorted(e for e in sample if not e.startswith("__") and e not in MEMBERS)
    if unknown:
        raise CorruptShardError(source, -1, f"sample {key} has members MLDS does not write: {', '.join(unknown)}")
    for member in (e for e in MEMBERS if e in sample):
        if not isinstance(sample[member], (bytes, bytearray)) or len(sample[member]) > member_limit(member):
            raise CorruptShardError(source, -1, f"{key}.{member} is not raw bytes within {member_limit(member)} bytes")
    meta = parse_meta(source, key, -1, sample[META])
    snapshots = sample.get(SNAPSHOTS)
    return Network(key, check_weights(source, key, -1, sample[WEIGHTS], meta), meta,
                   None if snapshots is None else check_weights(source, key, -1, snapshots, meta, SNAPSHOTS))


# --------------------------------------------------------------------------- catalog

@dataclass
class Catalog:
    """The networks of a set of shards, one per key.

    ``networks[(dataset, task)][seed]`` is the chosen copy (the first in shard
    path order). ``duplicates`` counts extra copies identical to the chosen one
    (same recipe and weights digest): kept once. ``conflicts`` maps each key
    whose copies differ to all its copies; such a key is reported, never
    silently resolved.
    """

    networks: dict[tuple[str, str], dict[int, Entry]]
    duplicates: int
    conflicts: dict[str, list[Entry]]
    corrupt: list[CorruptShardError]
    copies: dict[str, list[Entry]] = field(default_factory=dict)  # every copy of every key, shard path order

    def recipes(self, dataset: str, task: str) -> dict[str, int]:
        """Networks (keys) of a task per recipe, counting every recipe a key is stored under."""
        counts: dict[str, int] = defaultdict(int)
        for seed, chosen in self.networks.get((dataset, task), {}).items():
            for recipe in sorted({c.recipe for c in self.copies.get(chosen.key, [chosen])}):
                counts[recipe] += 1
        return dict(sorted(counts.items(), key=lambda rc: (-rc[1], rc[0])))

    def tasks(self, dataset: str) -> list[str]:
        return sorted(t for d, t in self.networks if d == dataset)


def build_catalog(indexes: Iterable[ShardIndex], corrupt: Iterable[CorruptShardError] = (),
                  recipes: set[str] | None = None) -> Catalog:
    """Group indexed copies by key (only copies of ``recipes``, if given)."""
    copies: dict[str, list[Entry]] = defaultdict(list)
    for index in sorted(indexes, key=lambda i: str(i.path)):
        for entry in index.entries:
            if recipes is None or entry.recipe in recipes:
                copies[entry.key].append(entry)
    networks: dict[tuple[str, str], dict[int, Entry]] = defaultdict(dict)
    duplicates, conflicts = 0, {}
    for key, found in copies.items():
        first = found[0]
        networks[(first.dataset, first.task)][first.seed] = first
        if len({c.identity for c in found}) > 1:
            conflicts[key] = found
        else:
            duplicates += len(found) - 1
    for task_networks in networks.values():
        items = sorted(task_networks.items())
        task_networks.clear()
        task_networks.update(items)
    return Catalog(dict(networks), duplicates, conflicts, list(corrupt), dict(copies))


def contained_path(base: str | os.PathLike, rel) -> Path:
    """``base / rel`` for a relative POSIX path ``rel`` that stays inside ``base`` (no absolute path,
    no ``..``, no link leading out); anything else raises ``ValueError``. For paths read from files
    (a package's manifest), which must never make MLDS read outside the folder."""
    base = Path(base)
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\\" in rel or "\0" in rel \
            or any(part in ("", ".", "..") for part in rel.split("/")) or (len(rel) > 1 and rel[1] == ":"):
        raise ValueError(f"{rel!r} is not a relative path inside {base}")
    path = base / rel
    try:
        inside = path.resolve().is_relative_to(base.resolve())
    except (OSError, RuntimeError):  # a link loop
        inside = False
    if not inside:
        raise ValueError(f"{rel!r} leads outside {base} (a symbolic link)")
    return path


def _links_between(root: Path, path: Path) -> bool:
    """Whether a folder between ``root`` (excluded) and ``path`` (excluded) is a symbolic link."""
    node = root
    for part in path.relative_to(root).parts[:-1]:
        node = node / part
        if node.is_symlink():
            return True
    return False


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
