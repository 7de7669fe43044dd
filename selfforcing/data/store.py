"""A store of precomputed records (latents, text embeddings, ODE pairs) in safetensors shards.

A record is a dict {name: tensor} plus JSON-able metadata (caption, prompt, source path, ...) and a
unique string key (what a resumed encode job checks to skip finished work). Layout of ``root``::

    manifest.json               the index: shards (file, bytes, sha256, records) and records
    shard-00000.safetensors     records 0..S-1; tensor "<record index>/<name>"
    shard-00001.safetensors     ...

manifest.json::

    {"format": "selfforcing-store", "version": 1, "attrs": {...store-wide, e.g. the encoder...},
     "shards": [{"file": "shard-00000.safetensors", "bytes": 1234, "sha256": "...", "num_records": 2}],
     "records": [{"key": "clip-0", "shard": 0,
                  "tensors": {"latents": {"dtype": "float32", "shape": [4, 16, 8, 8]}},
                  "metadata": {"caption": "..."}}, ...]}

Crash safety: a shard is written to a temp file, fsynced and renamed into place, and only then is the
manifest (same way) replaced by one that lists it. A kill at any moment therefore leaves the previous
manifest and its shards intact; records that were still buffered are simply not done, and
``StoreWriter(root, resume=True)`` continues after the last listed record (a shard file the manifest does
not list is overwritten). One writer per store at a time.

Reading: ``Store(root)`` is a torch Dataset over the records in the order they were written (the
manifest's order, so stable across runs and processes). Shards are opened lazily with safetensors
``safe_open`` (memory-mapped), checked against the manifest when first opened (byte size always, sha256
with ``verify="hash"``), and kept open in a small cache. A missing manifest or shard raises
FileNotFoundError naming it; a shard that does not match the manifest raises :class:`StoreError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ..fileio import atomic_write, atomic_write_text
from ..lru import LRUCache

MANIFEST = "manifest.json"
FORMAT = "selfforcing-store"
VERSION = 1


class StoreError(RuntimeError):
    """A store whose files do not match its manifest (truncated, corrupt, or inconsistent)."""


def shard_name(index: int) -> str:
    """File name of shard ``index``: shard-00000.safetensors, ..."""
    return f"shard-{index:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def file_sha256(path: str, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(root: str) -> dict:
    """Load and check ``root/manifest.json``; FileNotFoundError / StoreError name the file."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"store manifest not found: {path} (is {root} a store written by StoreWriter?)")
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"store manifest {path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"store manifest {path}: expected format {FORMAT!r}, "
                         f"got {manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r}")
    if manifest.get("version") != VERSION:
        raise StoreError(f"store manifest {path}: version {manifest.get('version')!r}, this code reads {VERSION}")
    for field in ("shards", "records"):
        if not isinstance(manifest.get(field), list):
            raise StoreError(f"store manifest {path}: missing list {field!r}")
    num_shards = len(manifest["shards"])
    for i, shard in enumerate(manifest["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("bytes"), int)
                and isinstance(shard.get("sha256"), str)):
            raise StoreError(f"store manifest {path}: shard entry {i} is malformed ({str(shard)[:200]})")
    for i, record in enumerate(manifest["records"]):
        if not (isinstance(record, dict) and isinstance(record.get("shard"), int) and 0 <= record["shard"] < num_shards
                and isinstance(record.get("tensors"), dict) and isinstance(record.get("key"), str)):
            raise StoreError(f"store manifest {path}: record {i} is malformed ({str(record)[:200]})")
    return manifest


def check_shard(root: str, shard: dict, verify: str = "size") -> str:
    """Check a manifest shard entry against its file; return the file's path.

    verify: "none", "size" (byte size equals the manifest's) or "hash" (size and sha256).
    Raises FileNotFoundError (missing) or StoreError (size / hash mismatch), naming the shard.
    """
    if verify not in ("none", "size", "hash"):
        raise ValueError(f"verify must be 'none', 'size' or 'hash', got {verify!r}")
    path = os.path.join(root, shard["file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"store shard missing: {path} (listed in {os.path.join(root, MANIFEST)})")
    if verify == "none":
        return path
    size = os.path.getsize(path)
    if size != shard["bytes"]:
        raise StoreError(f"store shard {path} is {size} bytes, the manifest says {shard['bytes']}: "
                         f"truncated or overwritten")
    if verify == "hash":
        digest = file_sha256(path)
        if digest != shard["sha256"]:
            raise StoreError(f"store shard {path} has sha256 {digest}, the manifest says {shard['sha256']}: corrupt")
    return path


class StoreWriter:
    """Append records to a store; every ``shard_size`` records (or ``max_shard_bytes``) become one shard.

    Args:
        root: the store folder (created if missing).
        shard_size: records per shard.
        resume: append to the store already in ``root`` (its listed shards are size-checked first);
            without it, an existing manifest is an error, so a store is never overwritten by accident.
        attrs: store-wide JSON-able facts (encoder name, latent shape, ...). On resume they must equal the
            stored ones, so records from different encoders are never mixed.
        max_shard_bytes: also close a shard once its tensors reach this many bytes.

    Use as a context manager (or call close()) so the last, partial shard is written.
    """

    def __init__(self, root: str, shard_size: int = 256, *, resume: bool = False, attrs: Mapping | None = None,
                 max_shard_bytes: int = 1 << 30) -> None:
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.root, self.shard_size, self.max_shard_bytes = os.path.abspath(root), shard_size, max_shard_bytes
        attrs = None if attrs is None else json.loads(_to_json(dict(attrs), "store attrs"))
        manifest_path = os.path.join(self.root, MANIFEST)
        if os.path.exists(manifest_path):
            if not resume:
                raise FileExistsError(f"a store already exists at {self.root} ({manifest_path}); "
                                      f"pass resume=True to append to it, or choose an empty folder")
            self.manifest = read_manifest(self.root)
            for shard in self.manifest["shards"]:
                check_shard(self.root, shard, "size")
            if attrs is not None and attrs != self.manifest.get("attrs", {}):
                stored = self.manifest.get("attrs", {})
                differ = sorted(k for k in set(attrs) | set(stored) if attrs.get(k) != stored.get(k))
                raise ValueError(f"store {self.root} was written with other attrs; differing keys {differ}: "
                                 f"stored {[stored.get(k) for k in differ]}, given {[attrs.get(k) for k in differ]}")
        else:
            os.makedirs(self.root, exist_ok=True)
            self.manifest = {"format": FORMAT, "version": VERSION, "attrs": attrs or {}, "shards": [], "records": []}
        for name in os.listdir(self.root):  # temp files of a killed writer
            if name.startswith(".tmp-"):
                os.remove(os.path.join(self.root, name))
        self._keys = {r["key"]: i for i, r in enumerate(self.manifest["records"])}
        self._buffer: list[tuple[dict, dict]] = []  # (tensors, record entry without shard)
        self._buffer_bytes = 0
        self._closed = False

    # -- queries used by a resumed job ----------------------------------------------------------------
    def done_keys(self) -> set[str]:
        """Keys of every record added so far (written in earlier runs, or buffered in this one)."""
        return set(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def metadata(self, key: str) -> dict:
        """The metadata stored with ``key``; KeyError naming the key and the store if absent."""
        if key not in self._keys:
            raise KeyError(f"no record with key {key!r} in store {self.root}")
        i = self._keys[key]
        num_written = len(self.manifest["records"])
        record = self.manifest["records"][i] if i < num_written else self._buffer[i - num_written][1]
        return json.loads(json.dumps(record["metadata"]))

    def __len__(self) -> int:
        return len(self._keys)

    # -- writing --------------------------------------------------------------------------------------
    def add(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping | None = None, key: str | None = None) -> str:
        """Buffer one record; write a shard when the buffer is full. Returns the record's key.

        tensors: {name: tensor} (any shape and safetensors dtype; copied to contiguous CPU memory, so later
        changes to the caller's tensors do not leak in). metadata: JSON-able mapping whose keys must not
        clash with tensor names (a read item holds both). key: unique string; default str(record index).
        """
        if self._closed:
            raise RuntimeError(f"StoreWriter for {self.root} is closed")
        index = len(self._keys)
        key = str(index) if key is None else key
        if not isinstance(key, str) or not key:
            raise TypeError(f"record key must be a non-empty str, got {key!r}")
        if key in self._keys:
            raise ValueError(f"record key {key!r} is already in store {self.root}")
        if not isinstance(tensors, Mapping) or not tensors:
            raise ValueError(f"record {key!r}: tensors must be a non-empty mapping name -> tensor")
        metadata = {} if metadata is None else dict(metadata)
        clash = sorted(set(metadata) & set(tensors))
        if clash:
            raise ValueError(f"record {key!r}: metadata keys {clash} clash with tensor names")
        metadata = json.loads(_to_json(metadata, f"record {key!r} metadata"))
        for name, tensor in tensors.items():  # check everything before changing any state
            if not isinstance(name, str) or not name:
                raise TypeError(f"record {key!r}: tensor names must be non-empty str, got {name!r}")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"record {key!r}: {name!r} is a {type(tensor).__name__}, expected a torch.Tensor")
            if tensor.layout != torch.strided:
                raise TypeError(f"record {key!r}: {name!r} is a {tensor.layout} tensor; only dense tensors are stored")
        stored = {f"{index}/{name}": t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        entry = {"key": key, "metadata": metadata,
                 "tensors": {name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
                             for name, t in tensors.items()}}
        self._buffer_bytes += sum(t.numel() * t.element_size() for t in stored.values())
        self._buffer.append((stored, entry))
        self._keys[key] = index
        if len(self._buffer) >= self.shard_size or self._buffer_bytes >= self.max_shard_bytes:
            self.flush()
        return key

    def flush(self) -> None:
        """Write the buffered records as one new shard, then the manifest that lists it (both atomic)."""
        if not self._buffer:
            return
        shard_index = len(self.manifest["shards"])
        name = shard_name(shard_index)
        tensors = {k: v for stored, _ in self._buffer for k, v in stored.items()}
        digest: dict[str, str] = {}

        def write_shard(tmp: str) -> None:
            save_file(tensors, tmp, metadata={"format": FORMAT, "shard": str(shard_index)})
            digest["sha256"] = file_sha256(tmp)

        atomic_write(os.path.join(self.root, name), write_shard)
        manifest = {
            **self.manifest,
            "shards": self.manifest["shards"] + [{"file": name, "bytes": os.path.getsize(os.path.join(self.root, name)),
                                                  "sha256": digest["sha256"], "num_records": len(self._buffer)}],
            "records": self.manifest["records"] + [{**entry, "shard": shard_index} for _, entry in self._buffer],
        }
        text = json.dumps(manifest, separators=(",", ":"))
        atomic_write_text(os.path.join(self.root, MANIFEST), text)
        self.manifest = manifest
        self._buffer, self._buffer_bytes = [], 0

    def close(self) -> None:
        """Flush the last shard and refuse further adds. A store with no records still gets a manifest."""
        if self._closed:
            return
        self.flush()
        if not os.path.exists(os.path.join(self.root, MANIFEST)):
            text = json.dumps(self.manifest, separators=(",", ":"))
            atomic_write_text(os.path.join(self.root, MANIFEST), text)
        self._closed = True

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        # Buffered records are complete (add() is all-or-nothing), so they are kept even when the job failed.
        self.close()


def _to_json(value, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-able (no NaN/inf): {err}") from None


class Store(Dataset):
    """Read a store: ``store[i]`` = {tensor name: tensor, **metadata} of record i, in written order.

    Args:
        root: the store folder.
        verify: how a shard is checked when first opened: "size" (default, free), "hash" (sha256,
            reads the whole shard once), or "none".
        max_open_shards: how many shard files stay open (least recently used are closed).

    Open shard handles are not pickled, so a Store can go to DataLoader workers; each worker reopens.
    """

    def __init__(self, root: str, *, verify: str = "size", max_open_shards: int = 64) -> None:
        if verify not in ("none", "size", "hash"):
            raise ValueError(f"verify must be 'none', 'size' or 'hash', got {verify!r}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"store folder not found: {root}")
        self.root, self.verify, self.max_open_shards = os.path.abspath(root), verify, max(1, max_open_shards)
        manifest = read_manifest(self.root)
        self.attrs: dict = manifest.get("attrs", {})
        self.shards: list[dict] = manifest["shards"]
        self.records: list[dict] = manifest["records"]
        self._index = {r["key"]: i for i, r in enumerate(self.records)}
        if len(self._index) != len(self.records):
            raise StoreError(f"store manifest {os.path.join(self.root, MANIFEST)} lists a key twice")
        self._shard_tensors: list[set[str]] = [set() for _ in self.shards]  # what each shard must hold
        for i, record in enumerate(self.records):
            self._shard_tensors[record["shard"]].update(f"{i}/{name}" for name in record["tensors"])
        self._open: LRUCache[int, object] = LRUCache(self.max_open_shards)

    def __len__(self) -> int:
        return len(self.records)

    def _position(self, index: int) -> int:
        n = len(self.records)
        try:
            index = operator.index(index)  # ints, numpy ints and 0-d integer tensors from samplers
        except TypeError:
            raise TypeError(f"record index must be an int, got {type(index).__name__}") from None
        if not -n <= index < n:
            raise IndexError(f"record index {index} out of range for {n} records in store {self.root}")
        return index % n

    def _handle(self, shard_index: int):
        """The open safe_open handle of a shard: checked against the manifest on first open, LRU-cached."""
        handle = self._open.get(shard_index)
        if handle is not None:
            return handle
        shard = self.shards[shard_index]
        path = check_shard(self.root, shard, self.verify)
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise StoreError(f"store shard {path} cannot be read as safetensors ({err})") from err
        missing = self._shard_tensors[shard_index] - set(handle.keys())
        if missing:
            raise StoreError(f"store shard {path} lacks {len(missing)} tensors the manifest lists, "
                             f"e.g. {sorted(missing)[:3]}")
        self._open.put(shard_index, handle)
        return handle

    def get(self, index: int, names=None) -> dict:
        """Record ``index``'s tensors (all, or only ``names``) merged with its metadata."""
        i = self._position(index)
        record = self.records[i]
        names = list(record["tensors"]) if names is None else list(names)
        unknown = [n for n in names if n not in record["tensors"]]
        if unknown:
            raise KeyError(f"record {record['key']!r} of store {self.root} has no tensors {unknown}; "
                           f"it has {list(record['tensors'])}")
        handle = self._handle(record["shard"])
        out = {}
        for name in names:
            tensor = handle.get_tensor(f"{i}/{name}")
            spec = record["tensors"][name]
            if list(tensor.shape) != spec["shape"] or _dtype_name(tensor.dtype) != spec["dtype"]:
                raise StoreError(f"store shard {os.path.join(self.root, self.shards[record['shard']]['file'])}: "
                                 f"{record['key']!r}/{name} is {_dtype_name(tensor.dtype)} {list(tensor.shape)}, "
                                 f"the manifest says {spec['dtype']} {spec['shape']}")
            out[name] = tensor
        out.update(json.loads(json.dumps(record["metadata"])))  # a copy: callers may mutate items
        return out

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self.get(i)

    def key(self, index: int) -> str:
        """The unique key record ``index`` was written with."""
        return self.records[self._position(index)]["key"]

    def metadata(self, index: int) -> dict:
        """Record ``index``'s metadata (a copy), without reading any tensor."""
        return json.loads(json.dumps(self.records[self._position(index)]["metadata"]))

    def index_of(self, key: str) -> int:
        """Position of the record written with ``key``; KeyError naming the key and the store if absent."""
        if key not in self._index:
            raise KeyError(f"no record with key {key!r} in store {self.root}")
        return self._index[key]

    def done_keys(self) -> set[str]:
        """Keys of all records in the store (what an encode job may skip)."""
        return set(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def verify_all(self) -> None:
        """Check every shard's size and sha256 against the manifest; raises naming the first bad shard."""
        for shard in self.shards:
            check_shard(self.root, shard, "hash")

    def close(self) -> None:
        """Drop the open shard handles (they are reopened, and re-checked, on the next read)."""
        self._open.clear()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = LRUCache(self.max_open_shards)  # open files do not pickle
        return state

    def __repr__(self) -> str:
        return f"Store({self.root!r}, records={len(self)}, shards={len(self.shards)})"
