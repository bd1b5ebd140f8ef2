"""Shared fixtures for the data tests: a tiny byte-level BPE tokenizer trained here (no hub)."""

import string

import pytest

from taskpgm_jax.data import load_tokenizer, synthetic_suite, train_byte_bpe


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A standard tokenizer directory, trained on the synthetic suite's text and some prose."""
    pool = synthetic_suite(seed=0)
    texts = [ex["prompt"] + ex["target"] for t in pool.tasks for ex in t.examples]
    texts += [string.ascii_letters + string.digits + string.punctuation + " \n"] * 3
    texts += ["The quick brown fox jumps over the lazy dog. Q: what? A: yes"] * 20
    out = tmp_path_factory.mktemp("tokenizer")
    train_byte_bpe(texts, out, vocab_size=400)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)
