"""Flash store reader (paper sec 2.2, 3.2): O_DIRECT, parallel reads, coalescing, integrity."""
import errno
import json
import os

import numpy as np
import pytest
import torch

from flashlib import layout, store
from flashlib.config import StoreConfig
from flashlib.store import (IO_BUFFERED, IO_DIRECT, AlignedBuffer, ChecksumError, FlashFileError,
                            FlashFormatError, FlashStore, ReadPool)

N_LAYERS, D_MODEL, D_FFN = 3, 64, 200        # fp16: vector 128 B, up|down bundle 256 B


def write(tmp_path, lay="bundled", name="m", **kw):
    src = layout.source_from_arrays(layout.synthetic_layers(N_LAYERS, D_MODEL, D_FFN, seed=3),
                                    name=name, n_layers=N_LAYERS, d_model=D_MODEL, d_ffn=D_FFN)
    return layout.write_flash_file(src, tmp_path / f"{name}.safetensors", layout=lay,
                                   progress=False, **kw)


def expected(layer, name, ids):
    return list(layout.synthetic_layers(N_LAYERS, D_MODEL, D_FFN, seed=3))[layer][name][ids]


@pytest.fixture
def bundled(tmp_path):
    return write(tmp_path)


def read(store_, layer, ids):
    buf = store_.new_buffer(len(ids))
    store_.read(layer, ids, buf)
    return buf.vectors(len(ids))


# --- page-cache bypass ---------------------------------------------------------------------

def test_default_mode_bypasses_the_page_cache(bundled):
    with FlashStore(bundled) as s:                 # tmp_path is on the same ext4 as the repo
        assert s.io_mode == IO_DIRECT
        s.evict()
        read(s, 1, np.arange(D_FFN))
        assert s.resident_fraction() == 0.0


def test_forced_buffered_mode_reads_the_same_and_drops_what_it_read(bundled):
    ids = np.array([5, 0, 199, 6, 7])
    with FlashStore(bundled, io_mode="buffered") as s:
        assert s.io_mode == IO_BUFFERED
        s.evict()
        got = read(s, 2, ids)
        assert s.resident_fraction() == 0.0        # fadvise(DONTNEED) after every read
    assert np.array_equal(got["down"], expected(2, "down", ids))


def test_refused_o_direct_falls_back_with_a_warning(bundled, monkeypatch):
    def refuse(path, probe):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(store, "_open_direct", refuse)
    with pytest.warns(RuntimeWarning, match="O_DIRECT refused"):
        with FlashStore(bundled) as s:
            assert s.io_mode == IO_BUFFERED
            assert np.array_equal(read(s, 0, [3])["up"], expected(0, "up", [3]))
    with pytest.raises(OSError):
        FlashStore(bundled, io_mode="direct")


def test_evict_and_residency(bundled):
    with open(bundled, "rb") as f:
        f.read()                                   # buffered read: the whole file is cached
    assert store.resident_fraction(bundled) == 1.0
    store.evict_from_page_cache(bundled)
    assert store.resident_fraction(bundled) == 0.0


# --- reads ---------------------------------------------------------------------------------

@pytest.mark.parametrize("coalesce", [True, False])
@pytest.mark.parametrize("n_threads", [1, 4])
def test_any_ids_in_any_order(bundled, coalesce, n_threads):
    ids = np.array([9, 10, 11, 3, 3, 150, 0, 199, 198, 12])     # runs, duplicates, unsorted
    with FlashStore(bundled, StoreConfig(n_threads=n_threads, coalesce=coalesce)) as s:
        got = read(s, 1, torch.tensor(ids))
    for name in ("up", "down"):
        assert np.array_equal(got[name], expected(1, name, ids))


def test_no_ids_read_nothing(bundled):
    with FlashStore(bundled) as s:
        assert s.read(0, np.array([], np.int64), s.new_buffer(1)) == 0
        assert s.counters.reads == 0


def test_adjacent_ids_are_coalesced_into_one_read(bundled):
    ids = [3, 4, 5, 9, 20, 21]
    with FlashStore(bundled) as s:
        read(s, 0, ids)
        c = s.reset_counters()
        assert (c.reads, c.neurons, c.bytes_read) == (3, 6, 6 * s.row_stride)
    with FlashStore(bundled, StoreConfig(coalesce=False)) as s:
        read(s, 0, ids)
        assert s.counters.reads == 6


def test_long_runs_are_split_at_max_read_bytes(bundled):
    stride = layout.read_manifest(bundled)["row_stride"]
    with FlashStore(bundled, StoreConfig(max_read_bytes=2 * stride)) as s:
        got = read(s, 2, list(range(10, 15)))
        assert s.counters.reads == 3                                # 2 + 2 + 1 rows
    assert np.array_equal(got["up"], expected(2, "up", list(range(10, 15))))


def test_whole_layer_with_many_threads(bundled):
    with FlashStore(bundled, StoreConfig(n_threads=8, max_read_bytes=4096 * 3)) as s:
        got = read(s, 0, np.arange(D_FFN))
    assert np.array_equal(got["down"], expected(0, "down", np.arange(D_FFN)))


def test_separate_layout_reads_each_vector_on_its_own(tmp_path):
    path = write(tmp_path, lay="separate")
    ids = [8, 2, 100]
    with FlashStore(path) as s:
        got = read(s, 1, ids)
        c = s.counters
        assert (c.reads, c.bytes_read) == (2 * len(ids), 2 * len(ids) * s.row_stride)
        assert s.row_stride == 4096                # one 128 B vector padded to the row alignment
    for name in ("up", "down"):
        assert np.array_equal(got[name], expected(1, name, ids))


def test_separate_layout_coalesces_with_scatter_reads(tmp_path):
    path = write(tmp_path, lay="separate")
    with FlashStore(path) as s:
        got = read(s, 2, [40, 41, 42, 43])
        assert s.counters.reads == 2                # one preadv per matrix, 4 iovecs each
    assert np.array_equal(got["down"], expected(2, "down", [40, 41, 42, 43]))


def test_compact_alignment_round_trips(tmp_path):
    from flashlib.config import FLASH_FILE_PRESETS
    path = write(tmp_path, config=FLASH_FILE_PRESETS["compact"])
    with FlashStore(path) as s:
        assert s.row_stride == 512
        got = read(s, 0, [1, 2, 50])
    assert np.array_equal(got["up"], expected(0, "up", [1, 2, 50]))


def test_aligned_numpy_out_and_torch_views_share_memory(bundled):
    with FlashStore(bundled) as s:
        buf = s.new_buffer(2)
        rows = buf.rows()                          # a plain aligned ndarray [2, slot] works too
        s.read(0, [4, 5], rows)
        t = buf.bundles(2, torch=True)
        assert t.shape == (2, 2 * D_MODEL) and t.dtype == torch.float16
        rows[0, 0] = 7
        assert t[0, 0].item() == 7.0
    assert np.array_equal(buf.vectors(2)["up"][1], expected(0, "up", [5])[0])


def test_counters_accumulate_and_reset(bundled):
    with FlashStore(bundled) as s:
        read(s, 0, [1])
        read(s, 1, [1, 50])
        c = s.reset_counters()
        assert (c.reads, c.neurons) == (3, 3) and c.io_seconds > 0
        assert s.counters.reads == 0


# --- errors: never wrong data --------------------------------------------------------------

def test_verify_names_the_corrupted_layer(bundled):
    m = layout.read_manifest(bundled)
    with FlashStore(bundled) as s:
        s.verify()
    with open(bundled, "r+b") as f:
        f.seek(m["layers"][2]["offset"] + 1000)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    with FlashStore(bundled) as s, pytest.raises(ChecksumError, match=r"layer\(s\) \[2\]"):
        s.verify()


def test_truncated_file_is_refused(bundled):
    size = bundled.stat().st_size
    os.truncate(bundled, size - 4096)
    with pytest.raises(FlashFileError, match="truncated"):
        FlashStore(bundled)


def test_manifest_of_another_version_is_refused(bundled):
    mp = layout.manifest_path(bundled)
    m = json.loads(mp.read_text())
    mp.write_text(json.dumps({**m, "format_version": layout.FORMAT_VERSION + 1}))
    with pytest.raises(FlashFormatError, match="format version"):
        FlashStore(bundled)
    mp.unlink()
    with pytest.raises(FlashFileError, match="no manifest"):
        FlashStore(bundled)


def test_manifest_of_another_file_is_refused(tmp_path):
    a, b = write(tmp_path, name="a"), write(tmp_path, lay="separate", name="b")
    layout.manifest_path(a).write_text(layout.manifest_path(b).read_text())
    with pytest.raises(FlashFileError, match="manifest"):
        FlashStore(a)


@pytest.mark.parametrize("layer, ids, match", [
    (0, [0, D_FFN], f"neuron id {D_FFN} out of range"),
    (0, [-1], "neuron id -1 out of range"),
    (N_LAYERS, [0], f"layer {N_LAYERS} out of range"),
])
def test_out_of_range_is_refused(bundled, layer, ids, match):
    with FlashStore(bundled) as s, pytest.raises(IndexError, match=match):
        s.read(layer, ids, s.new_buffer(2))


def test_non_integer_ids_are_refused(bundled):
    with FlashStore(bundled) as s, pytest.raises(TypeError, match="integer"):
        s.read(0, [1.5], s.new_buffer(1))


def test_wrong_out_is_refused(bundled, tmp_path):
    other = write(tmp_path, name="o", dtype="float32")
    with FlashStore(bundled) as s, FlashStore(other) as o:
        slot = s.slot_bytes // 2
        bad = {
            "too small": s.new_buffer(1),
            "other file's buffer": o.new_buffer(4),
            "wrong dtype": AlignedBuffer(4, s.slot_bytes, "float32").rows(),
            "wrong shape": AlignedBuffer(4, s.slot_bytes, "float16").rows().reshape(8, -1),
            "unaligned": np.frombuffer(AlignedBuffer(5, s.slot_bytes).memoryview, np.float16,
                                       count=4 * slot, offset=8).reshape(4, slot),
        }
        for why, out in bad.items():
            with pytest.raises(ValueError):
                s.read(0, [1, 2], out)
        with pytest.raises(TypeError):
            s.read(0, [1, 2], [[0.0] * slot] * 2)


# --- the worker pool -----------------------------------------------------------------------

def test_read_pool_reports_short_reads_and_stays_usable(tmp_path):
    p = tmp_path / "small.bin"
    p.write_bytes(bytes(range(256)) * 32)          # 8 KiB
    fd, mode = store.open_for_reads(p)
    pool = ReadPool(fd, 3)
    try:
        buf = AlignedBuffer(4, 4096)
        mv = buf.memoryview
        with pytest.raises(FlashFileError, match="short read"):
            pool.run([(0, [mv[:4096]], 4096), (8192, [mv[4096:8192]], 4096)])
        assert pool.run([(4096, [mv[8192:12288]], 4096)]) == 4096
        assert bytes(mv[8192:8192 + 4]) == bytes([0, 1, 2, 3])
    finally:
        pool.close()
        os.close(fd)
    assert not any(t.is_alive() for t in pool._threads)


@pytest.mark.parametrize("steal", [True, False])
def test_read_pool_reads_every_item_exactly_once(tmp_path, steal):
    p = tmp_path / "blocks.bin"
    p.write_bytes(b"".join(bytes([i]) * 4096 for i in range(64)))
    fd, _ = store.open_for_reads(p)
    pool = ReadPool(fd, 5, steal=steal)
    try:
        buf = AlignedBuffer(64, 4096)
        order = np.random.default_rng(1).permutation(64)
        reads = [(int(b) * 4096, [buf.memoryview[j * 4096:(j + 1) * 4096]], 4096)
                 for j, b in enumerate(order)]
        assert pool.run(reads) == 64 * 4096
        assert [buf.memoryview[j * 4096] for j in range(64)] == order.tolist()
    finally:
        pool.close()
        os.close(fd)


def test_balanced_slices():
    assert store._balanced_slices([1] * 10, 4) == [0, 2, 5, 7, 10]
    assert store._balanced_slices([1] * 3, 8) == [0, 1, 2, 3]
    assert store._balanced_slices([100, 1, 1, 1, 1], 2) == [0, 1, 5]
    assert store._balanced_slices([], 4) == [0]


def test_small_batch_plan_matches_the_vectorised_one():
    """Reads of a few ids are planned in plain Python; the runs must equal the numpy version's."""
    from flashlib.store import _runs, _runs_small
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n, max_rows = int(rng.integers(0, 33)), int(rng.integers(1, 6))
        ids = rng.choice(60, n, replace=False)
        if rng.random() < 0.5:
            ids = np.sort(ids)
        starts, ends = _runs(ids, max_rows)
        assert _runs_small(ids.tolist(), max_rows) == (starts.tolist(), ends.tolist(), ids[starts].tolist())


@pytest.mark.parametrize("field, change", [("d_model", lambda v: 2 * v), ("d_ffn", lambda v: v + 1),
                                           ("layout", lambda v: "bundled"), ("row_stride", lambda v: v + 512)])
def test_a_manifest_that_disagrees_with_its_file_is_refused_naming_the_field(tmp_path, field, change):
    path = write(tmp_path, lay="separate") if field == "layout" else write(tmp_path)
    mp = layout.manifest_path(path)
    m = json.loads(mp.read_text())
    m[field] = change(m[field])                        # row_stride + 512: a stride O_DIRECT would still accept
    mp.write_text(json.dumps(m))
    with pytest.raises(FlashFileError, match=rf"{path}: .*{field}.*write_flash_file"):
        FlashStore(path)


def test_a_flipped_byte_in_the_header_is_a_flash_file_error_not_a_decode_error(bundled):
    with open(bundled, "r+b") as f:
        f.seek(12)
        b = f.read(1)
        f.seek(12)
        f.write(bytes([b[0] | 0x80]))                  # invalid UTF-8 inside the JSON header
    with pytest.raises(FlashFileError, match=r"safetensors header: not valid UTF-8 JSON .*write_flash_file"):
        FlashStore(bundled)


def test_a_manifest_that_is_not_text_is_a_clear_error(bundled):
    mp = layout.manifest_path(bundled)
    mp.write_bytes(b"\xff\xfe" + mp.read_bytes()[2:])
    with pytest.raises(FlashFileError, match=r"manifest .* is not valid UTF-8 JSON"):
        FlashStore(bundled)
