"""Flash file writer (paper sec 3.2): every layout, dtype and model family reads back bit-exact."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from flashlib import layout
from flashlib.config import FlashFileConfig
from flashlib.models import ffn_adapter
from flashlib.store import FlashStore


# --- tiny models ----------------------------------------------------------------------------

def tiny_opt():
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=96, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=32,
                    activation_function="relu")
    return OPTForCausalLM(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def make_source(kind):
    """(LayerSource, expected {layer: {name: float32 [d_ffn, d_model]}}, model or None)."""
    if kind == "arrays":
        names, (n, d, f) = ("up", "down"), (3, 40, 70)
        expected = dict(enumerate(layout.synthetic_layers(n, d, f, names, seed=1,
                                                          dtype="float32")))
        src = layout.source_from_arrays(iter(expected[i] for i in range(n)), name="arrays",
                                        n_layers=n, d_model=d, d_ffn=f, vector_names=names)
        return src, expected, None
    model = tiny_opt() if kind == "opt" else tiny_llama()
    ad = ffn_adapter(model)
    expected = {i: {k: v.detach().float().numpy().copy() for k, v in ad.neuron_vectors(i).items()}
                for i in range(ad.n_layers)}
    return layout.source_from_adapter(ad, name=f"tiny-{kind}"), expected, model


def ids_for(d_ffn):
    rng = np.random.default_rng(0)
    ids = rng.choice(d_ffn, size=min(d_ffn, 23), replace=False)
    return np.concatenate([ids, [0, 1, 2, d_ffn - 1]])  # plus a run of adjacent ids and the last


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["opt", "llama", "arrays"])
@pytest.mark.parametrize("lay", ["bundled", "separate"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_is_bit_identical(tmp_path, kind, lay, dtype):
    src, expected, _ = make_source(kind)
    path = layout.write_flash_file(src, tmp_path / f"{kind}.safetensors", layout=lay, dtype=dtype,
                                   progress=False)
    ids = ids_for(src.d_ffn)
    with FlashStore(path) as store:
        buf = store.new_buffer(len(ids))
        for layer in range(src.n_layers):
            store.read(layer, ids, buf)
            got = buf.vectors(len(ids))
            for name in src.vector_names:
                want = expected[layer][name].astype(dtype)[ids]
                assert got[name].dtype == np.dtype(dtype)
                assert np.array_equal(got[name].view(np.uint8), want.view(np.uint8)), (layer, name)
        store.verify()


@pytest.mark.parametrize("lay", ["bundled", "separate"])
def test_safetensors_opens_the_file_and_sees_the_same_tensors(tmp_path, lay):
    src, expected, _ = make_source("llama")
    path = layout.write_flash_file(src, tmp_path / "m.safetensors", layout=lay, progress=False)
    d = src.d_model
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["layout"] == lay
        for layer in range(src.n_layers):
            if lay == "bundled":
                t = f.get_tensor(f"layers.{layer}.bundles")             # [d_ffn, stride]
                for k, name in enumerate(src.vector_names):
                    want = torch.from_numpy(expected[layer][name]).half()
                    assert torch.equal(t[:, k * d:(k + 1) * d], want)
                assert not t[:, len(src.vector_names) * d:].any()      # padding is zero
            else:
                for name in src.vector_names:
                    t = f.get_tensor(f"layers.{layer}.{name}")
                    assert torch.equal(t[:, :d], torch.from_numpy(expected[layer][name]).half())


def test_bundled_store_exposes_bundles_in_vector_order(tmp_path):
    src, expected, _ = make_source("arrays")
    path = layout.write_flash_file(src, tmp_path / "a.safetensors", progress=False)
    with FlashStore(path) as store:
        buf = store.new_buffer(4)
        store.read(1, [7, 3, 4, 5], buf)
        bundles = buf.bundles(4, torch=True)                            # [n, 2*d_model]
        want = np.concatenate([expected[1]["up"], expected[1]["down"]], axis=1)[[7, 3, 4, 5]]
        assert bundles.shape == (4, store.bundle_width)
        assert torch.equal(bundles, torch.from_numpy(want.astype(np.float16)))


# --- the container -------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [FlashFileConfig(), FlashFileConfig(row_alignment=512)])
def test_data_and_every_row_are_aligned(tmp_path, cfg):
    src, _, _ = make_source("llama")
    path = layout.write_flash_file(src, tmp_path / "m.safetensors", config=cfg, progress=False)
    m = layout.read_manifest(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert m["data_offset"] == 8 + n and m["data_offset"] % cfg.alignment == 0
    json.loads(raw[8:8 + n])                                            # padded header still parses
    assert raw[8:8 + n].rstrip(b" ") != raw[8:8 + n]                    # ... with spaces
    assert m["row_stride"] % cfg.row_alignment == 0
    assert m["row_stride"] - m["row_padding"] == 3 * 48 * 2             # gate|up|down fp16
    assert all(e["offset"] % cfg.row_alignment == 0 for e in m["layers"])
    assert len(raw) == m["file_bytes"]


def test_manifest_records_geometry_and_checksums(tmp_path):
    src, _, _ = make_source("opt")
    path = layout.write_flash_file(src, tmp_path / "o.safetensors", layout="separate",
                                   dtype="float32", progress=False)
    m = layout.read_manifest(path)
    assert (m["format_version"], m["model_name"], m["family"]) == (layout.FORMAT_VERSION,
                                                                   "tiny-opt", "opt")
    assert (m["dtype"], m["layout"], m["n_layers"], m["d_model"], m["d_ffn"]) == \
        ("float32", "separate", 2, 32, 96)
    assert m["vector_names"] == ["up", "down"] and m["bundle_width"] == 64
    assert [sorted(e["tensors"]) for e in m["layers"]] == [["down", "up"]] * 2
    assert all(len(e["checksum"]) == 64 for e in m["layers"])           # sha256 hex
    assert m["layers"][0]["checksum"] != m["layers"][1]["checksum"]


def test_no_temporary_files_are_left(tmp_path):
    src, _, _ = make_source("arrays")
    layout.write_flash_file(src, tmp_path / "a.safetensors", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors"]


def test_rewrite_replaces_file_and_manifest(tmp_path):
    path = tmp_path / "a.safetensors"
    for seed in (1, 2):
        src = layout.source_from_arrays(layout.synthetic_layers(2, 16, 8, seed=seed), name="a",
                                        n_layers=2, d_model=16, d_ffn=8)
        layout.write_flash_file(src, path, progress=False)
    with FlashStore(path) as store:
        store.verify()
        buf = store.new_buffer(8)
        store.read(0, range(8), buf)
        want = next(layout.synthetic_layers(2, 16, 8, seed=2))["up"]
        assert np.array_equal(buf.vectors(8)["up"], want)


# --- bad input -----------------------------------------------------------------------------

def test_bad_layer_stream_leaves_no_file(tmp_path):
    def layers():
        yield {"up": np.zeros((8, 16)), "down": np.zeros((8, 16))}
        yield {"up": np.zeros((8, 15)), "down": np.zeros((8, 16))}      # wrong d_model
    src = layout.source_from_arrays(layers(), name="bad", n_layers=2, d_model=16, d_ffn=8)
    with pytest.raises(ValueError, match=r"layer 1 vector 'up'.*\(8, 15\)"):
        layout.write_flash_file(src, tmp_path / "bad.safetensors", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n_yielded, match", [(1, "ended after 1"), (3, "more than")])
def test_layer_count_must_match(tmp_path, n_yielded, match):
    src = layout.source_from_arrays(layout.synthetic_layers(n_yielded, 16, 8), name="x",
                                    n_layers=2, d_model=16, d_ffn=8)
    with pytest.raises(ValueError, match=match):
        layout.write_flash_file(src, tmp_path / "x.safetensors", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_vector_is_named(tmp_path):
    src = layout.source_from_arrays(iter([{"up": np.zeros((8, 16))}]), name="x", n_layers=1,
                                    d_model=16, d_ffn=8)
    with pytest.raises(ValueError, match="expected vectors"):
        layout.write_flash_file(src, tmp_path / "x.safetensors", progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"layout": "interleaved"}, "layout must be"),
    ({"dtype": "bfloat16"}, "dtype must be"),
    ({"config": FlashFileConfig(row_alignment=1000)}, "power of two"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    src = layout.source_from_arrays(layout.synthetic_layers(1, 16, 8), name="x", n_layers=1,
                                    d_model=16, d_ffn=8)
    with pytest.raises(ValueError, match=match):
        layout.write_flash_file(src, tmp_path / "x.safetensors", progress=False, **kwargs)


# --- resident weights ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_resident_holds_everything_but_the_ffn_matrices(tmp_path, kind):
    model = tiny_opt() if kind == "opt" else tiny_llama()
    paths = layout.write_model(model, ffn_adapter(model), tmp_path, name=kind, dtype="float32",
                               layouts=("bundled", "separate"), progress=False)
    assert set(paths) == {"bundled", "separate", "resident"}
    resident = layout.load_resident(paths["resident"])
    state = model.state_dict()
    ffn = {k for k in state if k.endswith(layout.FFN_WEIGHT_SUFFIXES[kind])}
    assert len(ffn) == 2 * len(ffn_adapter(model).vector_names)
    assert set(resident) == set(state) - ffn
    for k, v in resident.items():
        assert torch.equal(v, state[k]), k
    if kind == "opt":
        assert "model.decoder.layers.0.fc1.bias" in resident           # FFN biases are resident
    else:
        assert resident["lm_head.weight"] is resident["model.embed_tokens.weight"]  # tied, once
