"""The latent / ODE-pair store: exact round trips over shards, resume, atomic writes, named errors."""

import json
import os
import pickle

import pytest
import torch

from selfforcing.data import store as store_module
from selfforcing.data.store import Store, StoreError, StoreWriter, shard_name


def _record(i: int) -> tuple[dict, dict]:
    """Record i: tensors of several dtypes and shapes (scalar, empty, 5-D), values depending on i."""
    g = torch.Generator().manual_seed(i)
    tensors = {
        "latents": torch.randn(2, 3, 4, 2, 2, generator=g),
        "context": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, generator=g).half(),
        "ids": torch.randint(-(2**40), 2**40, (4,), generator=g),
        "pixels": torch.randint(0, 256, (2, 2, 3), generator=g, dtype=torch.uint8),
        "mask": torch.rand(6, generator=g) > 0.5,
        "scale": torch.tensor(float(i) / 3, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }
    metadata = {"caption": f"clip {i}: ünïcode ✓", "t": [1000.0, 937.5 - i / 7], "nested": {"i": i, "ok": i % 2 == 0}}
    return tensors, metadata


def _assert_same(item: dict, tensors: dict, metadata: dict) -> None:
    assert set(item) == set(tensors) | set(metadata)
    for name, t in tensors.items():
        assert item[name].dtype == t.dtype and item[name].shape == t.shape, name
        assert torch.equal(item[name], t), name
    assert {k: item[k] for k in metadata} == metadata


def _write(root, n, shard_size=3, start=0, **kw):
    with StoreWriter(root, shard_size=shard_size, **kw) as writer:
        for i in range(start, start + n):
            writer.add(*_record(i), key=f"clip-{i}")
    return writer


def test_round_trip_over_shards(tmp_path):
    root = tmp_path / "store"
    _write(root, 7, shard_size=3)
    # 7 records in shards of 3 -> 3 shards, the last one partial (written by close())
    assert sorted(os.listdir(root)) == ["manifest.json"] + [shard_name(i) for i in range(3)]
    manifest = json.loads((root / "manifest.json").read_text())
    assert [s["num_records"] for s in manifest["shards"]] == [3, 3, 1]
    assert [s["bytes"] for s in manifest["shards"]] == [os.path.getsize(root / shard_name(i)) for i in range(3)]
    assert manifest["records"][4]["tensors"]["context"] == {"dtype": "bfloat16", "shape": [5, 7]}

    store = Store(root)
    assert len(store) == 7 and store.done_keys() == {f"clip-{i}" for i in range(7)}
    for i, item in enumerate(store):  # iteration order = write order
        _assert_same(item, *_record(i))
        assert store.key(i) == f"clip-{i}" and store.index_of(f"clip-{i}") == i
    _assert_same(store[-1], *_record(6))
    assert set(store.get(2, names=["mask"])) == {"mask", "caption", "t", "nested"}
    with pytest.raises(IndexError, match="out of range for 7 records"):
        store[7]
    # handles are dropped when pickled (DataLoader workers) and reopened on use
    clone = pickle.loads(pickle.dumps(store))
    _assert_same(clone[4], *_record(4))
    store.verify_all()


def test_tensors_are_copied_on_add(tmp_path):
    x = torch.arange(6.0).view(2, 3).t()  # non-contiguous
    with StoreWriter(tmp_path, shard_size=10) as writer:
        writer.add({"x": x})
        x.mul_(-1)
    assert torch.equal(Store(tmp_path)[0]["x"], torch.arange(6.0).view(2, 3).t())


def test_resume_after_kill_appends_what_is_missing(tmp_path):
    root = tmp_path / "store"
    writer = StoreWriter(root, shard_size=2, attrs={"encoder": "identity"})
    for i in range(5):
        writer.add(*_record(i), key=f"clip-{i}")
    # "kill": the writer is dropped unclosed; record 4 was only buffered, and a crash left a temp file and
    # an orphan shard the manifest does not list
    del writer
    (root / ".tmp-junk").write_bytes(b"partial")
    (root / shard_name(2)).write_bytes(b"orphan written before the manifest")
    assert len(Store(root)) == 4

    with pytest.raises(FileExistsError, match=str(root)):
        StoreWriter(root, shard_size=2)
    with pytest.raises(ValueError, match=r"differing keys \['encoder'\]"):
        StoreWriter(root, resume=True, attrs={"encoder": "wan"})

    with StoreWriter(root, shard_size=2, resume=True, attrs={"encoder": "identity"}) as writer:
        done = writer.done_keys()
        assert done == {f"clip-{i}" for i in range(4)}
        assert writer.metadata("clip-3") == _record(3)[1]
        for i in range(8):
            if f"clip-{i}" not in done:
                writer.add(*_record(i), key=f"clip-{i}")
        with pytest.raises(ValueError, match="'clip-0' is already in store"):
            writer.add(*_record(0), key="clip-0")
    assert not any(name.startswith(".tmp-") for name in os.listdir(root))
    store = Store(root)
    assert [store.key(i) for i in range(len(store))] == [f"clip-{i}" for i in range(8)]
    assert store.attrs == {"encoder": "identity"}
    for i in range(8):
        _assert_same(store[i], *_record(i))
    store.verify_all()  # the orphan shard was replaced by a real one


def test_failed_flush_leaves_the_store_intact(tmp_path, monkeypatch):
    _write(tmp_path, 2, shard_size=2)
    real_save = store_module.save_file

    def dying_save(tensors, path, metadata=None):  # writes half a shard, then the process "dies"
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "save_file", dying_save)
    writer = StoreWriter(tmp_path, shard_size=2, resume=True)
    writer.add(*_record(2), key="clip-2")
    with pytest.raises(KeyboardInterrupt):
        writer.add(*_record(3), key="clip-3")
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", shard_name(0)]  # no temp file, no broken shard
    store = Store(tmp_path, verify="hash")
    assert len(store) == 2
    _assert_same(store[1], *_record(1))


def test_truncated_shard_is_named(tmp_path):
    _write(tmp_path, 4, shard_size=2)
    bad = tmp_path / shard_name(1)
    with open(bad, "r+b") as fh:
        fh.truncate(os.path.getsize(bad) - 10)
    store = Store(tmp_path)
    _assert_same(store[1], *_record(1))  # shard 0 is fine and still readable
    with pytest.raises(StoreError, match=rf"{shard_name(1)} is \d+ bytes, the manifest says \d+"):
        store[2]
    with pytest.raises(StoreError, match=shard_name(1)):
        StoreWriter(tmp_path, resume=True)


def test_corrupt_shard_of_right_size_fails_the_hash(tmp_path):
    _write(tmp_path, 2, shard_size=2)
    path = tmp_path / shard_name(0)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the tensor data, size unchanged
    path.write_bytes(bytes(data))
    assert Store(tmp_path, verify="size")[0]  # the size check alone cannot see it
    with pytest.raises(StoreError, match=rf"{shard_name(0)} has sha256 \w+, the manifest says"):
        Store(tmp_path, verify="hash")[0]
    with pytest.raises(StoreError, match=shard_name(0)):
        Store(tmp_path).verify_all()


def test_missing_manifest_and_shard_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="store folder not found: .*nowhere"):
        Store(tmp_path / "nowhere")
    _write(tmp_path, 3, shard_size=2)
    os.remove(tmp_path / shard_name(1))
    with pytest.raises(FileNotFoundError, match=f"store shard missing: .*{shard_name(1)}"):
        Store(tmp_path)[2]
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(FileNotFoundError, match=f"store manifest not found: {tmp_path / 'manifest.json'}"):
        Store(tmp_path)


def test_bad_records_are_rejected_by_name(tmp_path):
    with StoreWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="record 'a' metadata must be JSON-able"):
            writer.add({"x": torch.zeros(1)}, {"when": object()}, key="a")
        with pytest.raises(ValueError, match="record 'b' metadata must be JSON-able"):
            writer.add({"x": torch.zeros(1)}, {"loss": float("nan")}, key="b")
        with pytest.raises(ValueError, match=r"record 'c': metadata keys \['x'\] clash"):
            writer.add({"x": torch.zeros(1)}, {"x": 1}, key="c")
        with pytest.raises(TypeError, match="record 'd': 'x' is a list, expected a torch.Tensor"):
            writer.add({"ok": torch.ones(3), "x": [1, 2]}, key="d")
        assert len(writer) == 0  # nothing half-added
        writer.add({"x": torch.ones(2)}, {"caption": "ok"})
    store = Store(tmp_path)
    assert len(store) == 1 and store.key(0) == "0" and store[0]["caption"] == "ok"
