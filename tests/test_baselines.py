"""Dense streaming (paper sec 4, Tables 2-3): naive, hybrid and the page cache: dense equivalence, what is read, what stays."""
import copy
import os

import numpy as np
import pytest
import torch

from flashlib import streaming as bl
from flashlib.dram import DramBudgetError
from flashlib.clock import EngineError
from flashlib.engine import unique_parameters
from flashlib.models import load_model
from flashlib.store import FlashFileError

NEW = 6


@pytest.fixture(scope="module")
def smoke():
    model, tok = load_model("relu-opt-smoke", progress=False)
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                           pad_token_id=tok.eos_token_id)
    return model, ids, dense


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("flash")


def test_naive_reads_the_whole_model_every_step_and_equals_dense(smoke, root):
    model, ids, dense = smoke
    with bl.StreamingBaseline(copy.deepcopy(model), "relu-opt-smoke", 0.0, flash_root=root) as run:
        r = run.generate(ids, max_new_tokens=NEW)
        assert torch.equal(r.tokens, dense)
        assert run.resident_groups == set()
        file_bytes = os.path.getsize(run.files.stream) + sum(l["nbytes"] for l in run.src.store.manifest["layers"])
        assert (r.stats["bytes_read"] == file_bytes).all()           # everything, once per step
        assert (r.stats["mem_ms"] == 0).all()
        # the parameters live in the streamed buffers: nothing else holds the weights
        staged = sum(b.nbytes for b in {id(b): b for b in run.buffers.values()}.values())
        assert run.bytes_resident() == staged + run.ffn_buffer.nbytes


def test_chunked_streaming_of_the_ffn_equals_dense(smoke, root):
    model, ids, dense = smoke
    with bl.StreamingBaseline(copy.deepcopy(model), "relu-opt-smoke", 0.0, flash_root=root,
                              chunk_bytes=16 * 512) as run:             # 16 neurons per chunk, 8 chunks per layer
        assert run.chunk_rows == 16 and run.ffn_buffer.capacity == 16
        r = run.generate(ids, max_new_tokens=NEW)
        assert torch.equal(r.tokens, dense)
        assert (r.stats["neurons_loaded"] == 2 * 128).all()


def test_hybrid_keeps_what_fits_and_streams_the_rest(smoke, root):
    model, ids, dense = smoke
    naive = bl.StreamingBaseline(copy.deepcopy(model), "relu-opt-smoke", 0.0, flash_root=root)
    with bl.StreamingBaseline(copy.deepcopy(model), "relu-opt-smoke", 1.0, flash_root=root) as run:
        r = run.generate(ids, max_new_tokens=NEW)
        assert torch.equal(r.tokens, dense)
        assert run.resident_groups and run.bytes_resident() <= run.budget_bytes
        n = naive.generate(ids, max_new_tokens=NEW)
        assert r.stats["bytes_read"].iloc[-1] < n.stats["bytes_read"].iloc[-1]
    naive.close()


def test_resident_choice_follows_the_papers_order():
    sizes = {"globals": 10, "layer 0": 5, "layer 1": 5, "ffn 0": 20, "ffn 1": 20}
    # staging (default: the largest group of each kind) is kept aside only for what would still stream
    choose = bl.StreamingBaseline._choose_resident
    assert choose(sizes, 0) == set()
    assert choose(sizes, 39) == {"globals"}                              # a layer would leave 10+5+5+20 = 40
    assert choose(sizes, 40) == {"globals", "layer 0", "layer 1"}        # all attention + one FFN's staging
    assert choose(sizes, 59) == {"globals", "layer 0", "layer 1"}        # an FFN layer needs the other's staging
    assert choose(sizes, 60) == set(sizes)                               # everything resident: no staging


def test_stream_file_round_trips_every_parameter(smoke, tmp_path):
    model = copy.deepcopy(smoke[0])
    groups = bl.stream_groups(model, set())
    manifest = bl.write_stream_file(groups, tmp_path / "s.bin", "float32")
    raw = (tmp_path / "s.bin").read_bytes()
    names = {n for n, _ in unique_parameters(model)}
    seen = set()
    for gname, params in groups.items():
        g = manifest["groups"][gname]
        assert g["offset"] % bl.STREAM_ALIGN == 0 and g["nbytes"] % bl.STREAM_ALIGN == 0
        for e, (name, p) in zip(g["params"], params):
            n = p.numel() * p.element_size()
            got = torch.frombuffer(bytearray(raw[g["offset"] + e["offset"]:][:n]), dtype=p.dtype).view(p.shape)
            assert torch.equal(got, p.detach())
            seen.add(name)
    assert seen == names


def test_a_budget_below_the_read_buffers_is_refused(smoke, root):
    with pytest.raises(DramBudgetError, match=r"minimum budget is \d+ B"):
        bl.StreamingBaseline(copy.deepcopy(smoke[0]), "relu-opt-smoke", 0.2, flash_root=root)


def test_a_truncated_stream_file_stops_generation(smoke, tmp_path):
    model, ids, _ = smoke
    run = bl.StreamingBaseline(copy.deepcopy(model), "relu-opt-smoke", 0.0, flash_root=tmp_path)
    os.truncate(run.files.stream, 4096)
    with pytest.raises(EngineError, match="short read"):
        run.generate(ids, max_new_tokens=2)
    run.close()
    with pytest.raises(FlashFileError, match="stream-float32.bin is truncated: 4096 bytes"):
        bl.StreamingBaseline(copy.deepcopy(model), "relu-opt-smoke", 0.0, flash_root=tmp_path)


def test_dense_reference_reads_nothing_and_equals_dense(smoke, root):
    """The dense row of the latency tables: every weight resident, timed by the same hooks."""
    from flashlib.experiments import build_runner
    _, ids, dense = smoke
    with build_runner("dense", "relu-opt-smoke", None, tokenizer=None, flash_root=root) as run:
        r = run.generate(ids, max_new_tokens=NEW)
        assert torch.equal(r.tokens, dense)
        assert (r.stats["bytes_read"] == 0).all() and (r.stats["io_ms"] == 0).all()
        assert run.bytes_resident() == run.model_bytes


def test_the_page_cache_row_maps_the_same_files_and_equals_dense(smoke, root):
    """source "mmap": parameters are views of the mappings, faults bring the pages in (cold: read from disk)."""
    model, ids, dense = smoke
    with bl.StreamingBaseline(copy.deepcopy(model), "relu-opt-smoke", 0.0, source="mmap", flash_root=root) as run:
        r = run.generate(ids, max_new_tokens=NEW)
        assert torch.equal(r.tokens, dense)
        assert run.resident_at_start == 0.0 and r.stats["bytes_read"].iloc[0] > 0
        assert run.buffers == {} and run.bytes_resident() == 0            # the kernel holds the pages, not us
        emb = run.model.get_input_embeddings().weight
        base = np.frombuffer(run.src.maps["stream"], dtype=np.uint8).ctypes.data
        assert base <= emb.data_ptr() < base + len(run.src.maps["stream"])     # a view of the mapping


def test_files_in_another_dtype_are_converted_while_streaming(smoke, tmp_path):
    """fp16 files, fp32 compute (paper scale's setting): the output is the fp16-rounded model's."""
    from flashlib import layout
    from flashlib.config import ENGINE
    from flashlib.engine import flash_file
    from flashlib.models import ffn_adapter
    model, ids, _ = smoke
    m = copy.deepcopy(model)
    a = ffn_adapter(m)
    files = bl.WeightFiles(flash_file(m, a, "half-files", "bundled", "float16", tmp_path, ENGINE.flash_preset),
                           tmp_path / "stream-float16.bin")
    bl.write_stream_file(bl.stream_groups(m, layout.ffn_weight_names(m, a)), files.stream, "float16")
    rounded = copy.deepcopy(model).half().float()
    want = rounded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                            pad_token_id=rounded.config.eos_token_id)
    for source in ("direct", "mmap"):
        with bl.StreamingBaseline(copy.deepcopy(model), "half-files", 0.0, source=source, files=files) as run:
            assert run.converts and run.storage_dtype == torch.float16 and run.dtype == torch.float32
            assert torch.equal(run.generate(ids, max_new_tokens=NEW).tokens, want), source


def test_resident_groups_of_a_meta_model_are_loaded_from_the_files(smoke, tmp_path):
    from accelerate import init_empty_weights
    model, ids, dense = smoke
    with bl.StreamingBaseline(copy.deepcopy(model), "relu-opt-smoke", 0.0, flash_root=tmp_path) as run:
        files = run.files                                                   # written from the real model
    with init_empty_weights():
        meta = type(model)(model.config)
    meta.tie_weights()
    with bl.StreamingBaseline(meta.eval(), "relu-opt-smoke", 1.0, files=files) as run:   # hybrid: keeps what fits
        assert run.resident_groups and not any(p.is_meta for p in run.model.parameters() if p.numel())
        assert torch.equal(run.generate(ids, max_new_tokens=NEW).tokens, dense)
