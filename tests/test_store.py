"""streamq/calib/store.py: exact round trips, reopen for resume, refusals, prefetch, flush."""
import os
import threading

import pytest
import torch

from streamq.calib.store import ActivationStore
from streamq.errors import StreamqError

N, S, H = 5, 7, 12
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def samples(dtype, n=N, seed=0) -> list[torch.Tensor]:
    """Random samples plus the values a lossy path would mangle: NaN, infinities, -0, subnormals."""
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(1, S, H, generator=g) * 100).to(dtype) for _ in range(n)]
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.0e38]).to(dtype)
    xs[0].view(-1)[: special.numel()] = special
    return xs


def make(kind, tmp_path, dtype, **kw):
    if kind == "ram":
        return ActivationStore.in_ram(N, S, H, dtype)
    return ActivationStore.on_disk(str(tmp_path / "acts"), N, S, H, dtype, create=kw.get("create", True))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@pytest.mark.parametrize("kind", ["disk", "ram"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_bit_exact(kind, dtype, tmp_path):
    store = make(kind, tmp_path, dtype)
    xs, ys = samples(dtype), samples(dtype, seed=1)
    for i in range(N):
        store.write("a", i, xs[i])
        store.write("b", i, ys[i].transpose(1, 2).contiguous().transpose(1, 2))  # non-contiguous input
    for i in range(N):
        a, b = store.read("a", i), store.read("b", i)
        assert a.shape == (1, S, H) and a.device.type == "cpu"
        assert same_bits(a, xs[i]) and same_bits(b, ys[i])
    assert store.nbytes_per_sample == S * H * dtype.itemsize
    assert (store.path is None) == (kind == "ram")


@pytest.mark.parametrize("dtype", DTYPES)
def test_disk_read_takes_the_chunk_file_bytes(dtype, tmp_path, monkeypatch):
    """A disk read is the chunk file's raw bytes, not zarr's decode (which is refused here): bit-exact for every
    dtype; a chunk file cut short or grown is an error naming it; a compressed array still goes through zarr."""
    import zarr

    store = make("disk", tmp_path, dtype)
    xs = samples(dtype)
    for i in range(N):
        store.write("a", i, xs[i])
    decode = zarr.Array.__getitem__
    monkeypatch.setattr(zarr.Array, "__getitem__", lambda *a: pytest.fail("read through zarr's decode"))
    assert all(same_bits(store.read("a", i), xs[i]) for i in range(N))
    chunk = tmp_path / "acts" / "a" / "c" / "3" / "0" / "0"
    for size in (chunk.stat().st_size - 1, chunk.stat().st_size + 1):
        os.truncate(chunk, size)
        with pytest.raises(StreamqError, match=f"{chunk}: holds .* bytes, a sample is {S * H * dtype.itemsize}"):
            store.read("a", 3)
    monkeypatch.setattr(zarr.Array, "__getitem__", decode)
    if dtype != torch.float32:
        return
    arr = zarr.create_array(str(tmp_path / "z"), shape=(1, S, H), chunks=(1, S, H), dtype="float32",
                            compressors=zarr.codecs.BloscCodec())
    store._arrays["a"] = arr
    arr[0:1] = samples(torch.float32)[1].numpy()
    assert torch.equal(store._read("a", 0), samples(torch.float32)[1])


@pytest.mark.parametrize("kind", ["disk", "ram"])
def test_read_is_a_copy_and_unwritten_sample_refused(kind, tmp_path):
    store = make(kind, tmp_path, torch.float32)
    x = samples(torch.float32)[1]
    store.write("a", 2, x)
    store.read("a", 2).add_(1)  # a caller's in-place op must not reach the store
    assert torch.equal(store.read("a", 2), x)
    with pytest.raises(StreamqError, match="sample 3 of slot a was never written"):
        store.read("a", 3)
    with pytest.raises(StreamqError, match="out of range"):
        store.read("a", N)
    with pytest.raises(StreamqError, match="slot 'c'"):
        store.read("c", 0)


def test_reopen_sees_earlier_data(tmp_path):
    xs = samples(torch.bfloat16)
    store = make("disk", tmp_path, torch.bfloat16)
    for i in range(N):
        store.write("b", i, xs[i])
    store.flush("b")
    del store
    again = make("disk", tmp_path, torch.bfloat16, create=False)
    assert all(same_bits(again.read("b", i), xs[i]) for i in range(N))
    again.write("a", 0, xs[0])  # a reopened store is writable
    assert same_bits(again.read("a", 0), xs[0])


def test_reopen_takes_only_complete_slots(tmp_path):
    """A resumed run reads the slot its manifest points at (complete, flushed); a slot a killed block left half
    written is not trusted: its samples count as unwritten until this run writes them."""
    xs = samples(torch.float32)
    store = make("disk", tmp_path, torch.float32)
    for i in range(N):
        store.write("b", i, xs[i])
    store.flush("b")
    for i in range(2):
        store.write("a", i, xs[i])
    del store
    again = make("disk", tmp_path, torch.float32, create=False)
    assert same_bits(again.read("b", N - 1), xs[N - 1])
    with pytest.raises(StreamqError, match="sample 0 of slot a was never written"):
        again.read("a", 0)
    with pytest.raises(StreamqError, match="slot a lacks samples"):
        again.flush("a")
    for i in range(N):
        again.write("a", i, xs[i])
    again.flush("a")


def test_flush_fsyncs_the_slot_and_nothing_else(tmp_path, monkeypatch):
    """flush fsyncs each chunk file of the slot and each folder it lies in, then the metadata: nothing outside the
    store, nothing of the other slot (not a syncfs, which would also write back the kept intermediates' scratch
    files beside the store)."""
    import streamq.calib.store as store_module

    fsynced = []
    monkeypatch.setattr(store_module, "fsync_path", lambda path: fsynced.append(os.path.realpath(path)))
    store = make("disk", tmp_path, torch.float32)
    for i in range(N):
        store.write("a", i, samples(torch.float32)[i])
        store.write("b", i, samples(torch.float32)[i])
    store.flush("a")
    root = os.path.realpath(store._path)
    chunks = [os.path.realpath(store._sample_key("a", i)) for i in range(N)]
    assert set(chunks) | {os.path.dirname(c) for c in chunks} <= set(fsynced)
    slot_a = os.path.join(root, "a")
    assert all(p in (root, slot_a, os.path.join(root, "zarr.json")) or p.startswith(slot_a + os.sep)
               for p in fsynced), fsynced
    # N chunk files and a/zarr.json, the folders a/c/<i>/0, a/c/<i>, a/c, a, then zarr.json, root
    assert len(fsynced) == (N + 1) + (2 * N + 2) + 2, len(fsynced)
    assert fsynced[-1] == root


def test_sync_makes_durable_what_complete_checked(tmp_path, monkeypatch):
    """complete() checks a slot and defers its sync: sync() fsyncs every slot marked since the last one, nothing
    when none is; a partial slot is refused by complete() and never marked."""
    import streamq.calib.store as store_module

    fsynced = []
    monkeypatch.setattr(store_module, "fsync_path", lambda path: fsynced.append(path))
    store = make("disk", tmp_path, torch.float32)
    for i in range(N - 1):
        store.write("a", i, samples(torch.float32)[i])
    with pytest.raises(StreamqError, match=f"slot a lacks samples \\[{N - 1}\\]"):
        store.complete("a")
    store.sync()
    assert fsynced == []
    store.write("a", N - 1, samples(torch.float32)[N - 1])
    store.complete("a")
    assert fsynced == []
    store.sync()
    once = len(fsynced)
    store.sync()
    assert once == (N + 1) + (2 * N + 2) + 2 and len(fsynced) == once


def test_reopen_refuses_other_dtype_or_shape(tmp_path):
    path = str(tmp_path / "acts")
    ActivationStore.on_disk(path, N, S, H, torch.bfloat16, create=True)
    with pytest.raises(StreamqError, match=r"acts: holds \[5, 7, 12\] bfloat16.*needs \[5, 7, 12\] float16"):
        ActivationStore.on_disk(path, N, S, H, torch.float16, create=False)
    with pytest.raises(StreamqError, match=r"needs \[5, 8, 12\] bfloat16"):
        ActivationStore.on_disk(path, N, S + 1, H, torch.bfloat16, create=False)
    with pytest.raises(StreamqError, match="not found"):
        ActivationStore.on_disk(str(tmp_path / "nowhere"), N, S, H, torch.bfloat16, create=False)
    with pytest.raises(StreamqError, match="unsupported"):
        ActivationStore.in_ram(N, S, H, torch.float64)


def test_create_replaces_old_store_but_not_other_folders(tmp_path):
    store = make("disk", tmp_path, torch.float16)
    store.write("a", 0, samples(torch.float16)[0])
    fresh = make("disk", tmp_path, torch.float16)
    with pytest.raises(StreamqError, match="never written"):
        fresh.read("a", 0)  # the old sample is gone, not silently reused
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(StreamqError, match="not empty"):
        ActivationStore.on_disk(str(other), N, S, H, torch.float16, create=True)
    assert (other / "precious.txt").exists()


@pytest.mark.parametrize("kind", ["disk", "ram"])
def test_write_refuses_wrong_dtype_or_shape(kind, tmp_path):
    store = make(kind, tmp_path, torch.bfloat16)
    with pytest.raises(StreamqError, match="float32"):
        store.write("a", 0, torch.zeros(1, S, H))
    with pytest.raises(StreamqError, match=r"\(2, 7, 12\)"):
        store.write("a", 0, torch.zeros(2, S, H, dtype=torch.bfloat16))


@pytest.mark.parametrize("kind", ["disk", "ram"])
def test_iter_samples_prefetch_in_order(kind, tmp_path):
    store = make(kind, tmp_path, torch.float16)
    xs = samples(torch.float16)
    for i in range(N):
        store.write("a", i, xs[i])
    threads = []
    read = store._read
    store._read = lambda slot, i: (threads.append(threading.current_thread().name), read(slot, i))[1]
    got = list(store.iter_samples("a"))
    assert [i for i, _ in got] == list(range(N))
    assert all(same_bits(x, xs[i]) for i, x in got)
    assert all(name.startswith("streamq-prefetch") for name in threads) and len(threads) == N
    threads.clear()
    assert [i for i, _ in store.iter_samples("a", prefetch=False)] == list(range(N))
    assert threads == [threading.current_thread().name] * N
    # The ping-pong loop: read a, write b while the next read of a runs in the background.
    for i, x in store.iter_samples("a"):
        store.write("b", i, x * 2)
    assert all(same_bits(store.read("b", i), xs[i] * 2) for i in range(N))
    for i, _ in store.iter_samples("a"):  # leaving early must not hang
        break


def test_flush_syncs_files_and_refuses_partial_slot(tmp_path):
    store = make("disk", tmp_path, torch.bfloat16)
    xs = samples(torch.bfloat16)
    for i in range(N - 1):
        store.write("a", i, xs[i])
    with pytest.raises(StreamqError, match=r"slot a lacks samples \[4\] \(1 of 5\)"):
        store.flush("a")
    store.write("a", N - 1, torch.zeros(1, S, H, dtype=torch.bfloat16))  # all-zero chunk still a file
    store.flush("a")
    root = tmp_path / "acts"
    chunk_files = [os.path.join(d, f) for d, _, fs in os.walk(root / "a" / "c") for f in fs]
    assert len(chunk_files) == N
    assert all(os.path.getsize(f) == store.nbytes_per_sample for f in chunk_files)
    assert (root / "zarr.json").exists() and (root / "a" / "zarr.json").exists()
    ram = make("ram", tmp_path, torch.bfloat16)
    with pytest.raises(StreamqError, match="lacks samples"):
        ram.flush("b")
    for i in range(N):
        ram.write("b", i, xs[i])
    ram.flush("b")


def test_other_and_delete(tmp_path):
    assert ActivationStore.other("a") == "b" and ActivationStore.other("b") == "a"
    assert ActivationStore.other("fa") == "fb" and ActivationStore.fp("b") == "fb"
    with pytest.raises(StreamqError):
        ActivationStore.other("x")
    with pytest.raises(StreamqError):
        ActivationStore.fp("fa")
    store = make("disk", tmp_path, torch.float32)
    store.write("a", 0, torch.ones(1, S, H))
    store.delete()
    assert not (tmp_path / "acts").exists()
    with pytest.raises(StreamqError, match="after delete"):
        store.read("a", 0)


@pytest.mark.parametrize("where", ["disk", "ram"])
def test_fp_stream_slots(tmp_path, where):
    """A store with an fp stream has four independent slots; one without refuses the fp slots; a resumed store
    must have the slots the run needs."""
    plain = make(where, tmp_path / "plain", torch.float32)
    with pytest.raises(StreamqError, match="slot fa exists only in a store with an fp stream"):
        plain.write("fa", 0, torch.ones(1, S, H))
    if where == "disk":
        store = ActivationStore.on_disk(str(tmp_path / "fp"), N, S, H, torch.float32, create=True, fp_stream=True)
    else:
        store = ActivationStore.in_ram(N, S, H, torch.float32, fp_stream=True)
    assert store.slots == ("a", "b", "fa", "fb")
    for k, slot in enumerate(store.slots):
        for i in range(N):
            store.write(slot, i, torch.full((1, S, H), float(10 * k + i)))
        store.flush(slot)
    for k, slot in enumerate(store.slots):
        assert [x[0, 0, 0].item() for _, x in store.iter_samples(slot)] == [10 * k + i for i in range(N)]
    if where == "disk":
        reopened = ActivationStore.on_disk(str(tmp_path / "fp"), N, S, H, torch.float32, create=False, fp_stream=True)
        assert reopened.read("fb", 1)[0, 0, 0].item() == 31
        with pytest.raises(StreamqError, match="slot fa is missing"):
            ActivationStore.on_disk(str(tmp_path / "plain" / "acts"), N, S, H, torch.float32, create=False, fp_stream=True)
