"""Naive and hybrid baselines (paper sec 4, Tables 2-3): dense equivalence, what is read, what stays."""
import copy
import os

import pytest
import torch

from flashlib import baselines as bl
from flashlib.dram import DramBudgetError
from flashlib.engine import EngineError, unique_parameters
from flashlib.models import load_model

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
        file_bytes = os.path.getsize(run.stream_path) + sum(l["nbytes"] for l in run.store.manifest["layers"])
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
    reserve = 20 + 5                                               # staging: one FFN layer + one layer group
    assert bl.StreamingBaseline._choose_resident(sizes, 0) == set()
    assert bl.StreamingBaseline._choose_resident(sizes, 15 + reserve) == {"globals", "layer 0"}
    assert bl.StreamingBaseline._choose_resident(sizes, 40 + reserve) == {"globals", "layer 0", "layer 1", "ffn 0"}


def test_stream_file_round_trips_every_parameter(smoke, tmp_path):
    model = copy.deepcopy(smoke[0])
    groups = bl.stream_groups(model, set())
    manifest = bl.write_stream_file(groups, tmp_path / "s.bin")
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
    os.truncate(run.stream_path, 4096)
    with pytest.raises(EngineError, match="short read"):
        run.generate(ids, max_new_tokens=2)
    run.close()


def test_dense_reference_reads_nothing_and_equals_dense(smoke, root):
    """The dense row of the latency tables: every weight resident, timed by the same hooks."""
    from flashlib.experiments import build_runner
    _, ids, dense = smoke
    with build_runner("dense", "relu-opt-smoke", None, tokenizer=None, flash_root=root) as run:
        r = run.generate(ids, max_new_tokens=NEW)
        assert torch.equal(r.tokens, dense)
        assert (r.stats["bytes_read"] == 0).all() and (r.stats["io_ms"] == 0).all()
        assert run.bytes_resident() == run.model_bytes
