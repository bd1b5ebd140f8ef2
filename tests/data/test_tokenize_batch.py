"""Tokenization with target-only masks, truncation, multiple-choice rows, padding and packing."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from taskpgm_jax.data import (
    DataError, Encoded, encode_choices, encode_example, encode_prompt, encode_task, pack_batches,
    pack_rows, pad_batch, synthetic_suite,
)


def _word(rng, lo=1, hi=6):
    return "".join(rng.choice(list("abcdefghij klmnop"), size=int(rng.integers(lo, hi + 1))))


def test_tokenizer_dir_is_standard(tokenizer_dir, tokenizer):
    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    text = "add 12+30 = 42"
    assert auto(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert auto.decode(auto(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    # The BOS is prepended on reload from disk, and decoding without specials drops it.
    ids = auto(text)["input_ids"]
    assert ids[0] == auto.bos_token_id == 1 and ids[1:] == auto(text, add_special_tokens=False)[
        "input_ids"]
    assert auto.decode(ids, skip_special_tokens=True) == text
    assert auto(["", "ab"])["input_ids"][0] == [1]


def test_loss_mask_covers_exactly_the_target(tokenizer, rng):
    for _ in range(30):
        prompt, target = _word(rng, 3, 30) + " = ", _word(rng, 1, 12)
        enc = encode_example(tokenizer, prompt, target)
        ids, mask = enc.input_ids, enc.target_mask
        # Independent check: the prompt tokenized alone is the unmasked prefix, and the masked
        # part decodes to the target followed by EOS.
        p_ids = tokenizer(prompt)["input_ids"]
        assert ids[: len(p_ids)].tolist() == p_ids and not mask[: len(p_ids)].any()
        assert mask[len(p_ids):].all()
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[mask][:-1]) == target
        no_eos = encode_example(tokenizer, prompt, target, add_eos=False)
        assert no_eos.input_ids.tolist() == ids[:-1].tolist()


def test_truncation_cuts_the_prompt_from_the_left(tokenizer, rng):
    prompt = " ".join(_word(rng, 4, 8) for _ in range(20)) + " = "
    target = _word(rng, 3, 8)
    full = encode_example(tokenizer, prompt, target)
    n_target = int(full.target_mask.sum())
    max_len = n_target + 5
    cut = encode_example(tokenizer, prompt, target, max_length=max_len)
    assert len(cut) == max_len and cut.truncated == len(full) - max_len
    # The BOS, then the *last* prompt tokens; the target is whole.
    bos = tokenizer.bos_token_id
    assert cut.input_ids.tolist() == [bos] + full.input_ids[1 - max_len:].tolist()
    assert cut.target_mask.sum() == n_target
    # A target longer than the limit keeps its head, after the BOS.
    short = encode_example(tokenizer, prompt, target * 10, max_length=4)
    assert len(short) == 4 and short.target_mask.tolist() == [False, True, True, True]
    whole = encode_example(tokenizer, "", target * 10)
    assert short.input_ids.tolist() == whole.input_ids[:4].tolist()


class _BosTok:
    """A tokenizer stub that prepends BOS, as Llama tokenizers do; one id per character."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) + 10 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_truncation_keeps_bos():
    enc = encode_example(_BosTok(), "abcdefgh", "xy", max_length=6)
    assert enc.input_ids.tolist() == [1, ord("g") + 10, ord("h") + 10, ord("x") + 10,
                                      ord("y") + 10, 2]
    assert enc.target_mask.tolist() == [False, False, False, True, True, True]


class _NoBosTok:
    """A tokenizer stub without BOS, as Qwen2 tokenizers are; one id per character."""

    bos_token_id, eos_token_id = None, 2

    def __call__(self, text, add_special_tokens=True):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [ord(c) + 10 for c in text]}


def _c(text):
    return [ord(c) + 10 for c in text]


def test_first_target_token_always_has_a_position_before_it(tokenizer):
    """The loss on token t is taken at position t - 1: every row keeps a token before its target,
    so pad_batch scores every target token (checked against hand-built rows)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    five = tokenizer("5", add_special_tokens=False)["input_ids"]
    enc = encode_example(tokenizer, "", "5")  # an empty prompt gets the BOS
    assert enc.input_ids.tolist() == [bos, *five, eos]
    assert enc.target_mask.tolist() == [False] + [True] * (len(five) + 1)
    batch = pad_batch([enc], seq_len=8)
    assert batch.loss_mask.sum() == enc.target_mask.sum()
    assert encode_prompt(tokenizer, "", max_length=4) == ([bos], 0)
    # Without a BOS: the prompt's last token stays before a target cut to fit ...
    enc = encode_example(_NoBosTok(), "abc", "wxyz", max_length=3)
    assert enc.input_ids.tolist() == _c("cwx") and enc.target_mask.tolist() == [False, True, True]
    assert enc.truncated == 2 + 3  # "ab" of the prompt, "yz" and the EOS of the target
    assert pad_batch([enc], seq_len=3).loss_mask.sum() == 2
    # ... (with a BOS, the BOS stays) ...
    enc = encode_example(_BosTok(), "abc", "wxyz", max_length=3)
    assert enc.input_ids.tolist() == [1, *_c("wx")] and enc.truncated == 3 + 3
    # ... and an empty prompt is an error naming the example, unless a separator fills it.
    rows = [{"prompt": "a", "target": "b", "choices": []}, {"prompt": "", "target": "b",
                                                             "choices": []}]
    with pytest.raises(DataError, match=r"example 1: empty prompt.*no BOS token"):
        encode_task(_NoBosTok(), rows)
    assert encode_task(_NoBosTok(), rows, separator=" ")[1].input_ids.tolist() == _c(" b") + [2]
    with pytest.raises(DataError, match="generation prompt: empty prompt"):
        encode_prompt(_NoBosTok(), "")
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        encode_example(_BosTok(), "abc", "w", max_length=1)


def test_target_filling_max_length_exactly_keeps_a_context_token(rng):
    """Without a BOS, a target whose tokens plus EOS are exactly max_length long: the prompt's
    last token stays and the target loses its last token, so every target token kept is scored
    (before, the prompt was cut to nothing and the first target token went unscored)."""
    for _ in range(5):
        prompt = _word(rng, 1, 6)
        max_len = int(rng.integers(2, 8))
        target = _word(rng, max_len - 1, max_len - 1)  # + EOS = max_len tokens
        enc = encode_example(_NoBosTok(), prompt, target, max_length=max_len)
        kept = (_c(target) + [2])[:max_len - 1]
        assert enc.input_ids.tolist() == _c(prompt[-1]) + kept
        assert enc.target_mask.tolist() == [False] + [True] * len(kept)
        assert enc.truncated == len(prompt) - 1 + 1  # the rest of the prompt, and the EOS
        assert pad_batch([enc], seq_len=max_len).loss_mask.sum() == len(kept)


def test_multiple_choice_rows(tokenizer, rng):
    choices = [_word(rng, 2, 9) for _ in range(4)]
    rows = encode_choices(tokenizer, "which? ", choices, example=7)
    assert [r.choice for r in rows] == [0, 1, 2, 3] and {r.example for r in rows} == {7}
    for r, c in zip(rows, choices, strict=True):
        assert tokenizer.decode(r.input_ids[r.target_mask]) == c
    ds = [{"prompt": "p1 ", "target": "b", "choices": ["a", "b"]},
          {"prompt": "p2 ", "target": "zz", "choices": []}]
    scoring = encode_task(tokenizer, ds, mode="choices")
    assert [(e.example, e.choice) for e in scoring] == [(0, 0), (0, 1), (1, -1)]
    train = encode_task(tokenizer, ds)
    assert len(train) == 2 and tokenizer.decode(train[0].input_ids[train[0].target_mask]) == \
        "b" + tokenizer.eos_token


def _random_seqs(rng, n, max_len):
    out = []
    for i in range(n):
        length = int(rng.integers(2, max_len + 1))
        n_prompt = int(rng.integers(1, length))
        mask = np.arange(length) >= n_prompt
        out.append(Encoded(rng.integers(3, 400, size=length).astype(np.int32), mask, example=i))
    return out


def test_padding_layout(rng):
    seqs = _random_seqs(rng, 5, 12)
    b = pad_batch(seqs, seq_len=16, batch_size=8)
    assert b.input_ids.shape == (8, 16) and b.input_ids.dtype == np.int32
    for r, s in enumerate(seqs):
        n = len(s)
        assert b.input_ids[r, :n].tolist() == s.input_ids.tolist()
        assert (b.segment_ids[r, :n] == 1).all() and (b.segment_ids[r, n:] == 0).all()
        assert b.positions[r, :n].tolist() == list(range(n))
        assert b.targets[r, : n - 1].tolist() == s.input_ids[1:].tolist()
        assert b.loss_mask[r, : n - 1].tolist() == s.target_mask[1:].astype(np.float32).tolist()
        assert b.loss_mask[r, n - 1:].sum() == 0
    assert b.segment_ids[5:].sum() == 0 and b.loss_mask[5:].sum() == 0
    assert (b.attention_mask == (b.segment_ids > 0)).all()
    with pytest.raises(ValueError, match="seq_len"):
        pad_batch(_random_seqs(rng, 1, 30) + [Encoded(np.zeros(40, np.int32),
                                                      np.ones(40, bool), example=3)], 32)


def _toy_attention(ids, segment_ids, positions, params):
    """One causal attention layer with segment masking, written from the decoder's contract."""
    emb, pos_emb, wq, wk, wv = params
    x = emb[ids] + pos_emb[positions]
    q, k, v = x @ wq, x @ wk, x @ wv
    s = q @ k.T / np.sqrt(q.shape[-1])
    n = len(ids)
    allowed = (segment_ids[:, None] == segment_ids[None, :]) & (segment_ids[:, None] > 0)
    allowed &= np.tril(np.ones((n, n), bool))
    allowed |= np.eye(n, dtype=bool) & (segment_ids[:, None] == 0)  # padding sees itself only
    s = np.where(allowed, s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True)) @ v


def test_packing_isolates_segments(rng):
    seqs = _random_seqs(rng, 40, 20)
    seq_len = 48
    batches = pack_batches(seqs, seq_len, batch_size=4)
    d = 8
    params = (rng.normal(size=(400, d)), rng.normal(size=(seq_len, d)),
              *(rng.normal(size=(d, d)) for _ in range(3)))
    seen = []
    for b in batches:
        for r in range(b.input_ids.shape[0]):
            seg, pos, ids = b.segment_ids[r], b.positions[r], b.input_ids[r]
            if not seg.any():
                continue
            out = _toy_attention(ids, seg, pos, params)
            for k in range(1, seg.max() + 1):
                where = np.flatnonzero(seg == k)
                assert (np.diff(where) == 1).all()
                assert pos[where].tolist() == list(range(len(where)))
                alone = ids[where]
                seen.append(alone.tolist())
                ref = _toy_attention(alone, np.ones(len(where), np.int32),
                                     np.arange(len(where)), params)
                np.testing.assert_allclose(out[where], ref, rtol=1e-10, atol=1e-12)
                # Targets never cross into the next segment.
                assert b.targets[r, where[-1]] == 0 and b.loss_mask[r, where[-1]] == 0
    # Every sequence packed exactly once, in order.
    assert seen == [s.input_ids.tolist() for s in seqs]
    # Greedy packing: no row could have taken the next row's first sequence.
    rows = pack_rows(seqs, seq_len)
    for a, b in zip(rows[:-1], rows[1:], strict=True):
        assert sum(map(len, a)) + len(b[0]) > seq_len


def test_synthetic_suite_fits_short_sequences(tokenizer):
    # A small model learns the suite quickly only if sequences stay short.
    pool = synthetic_suite(seed=1)
    lengths = [len(e) for t in pool.names for e in encode_task(tokenizer, pool.train(t))]
    assert max(lengths) <= 32 and np.mean(lengths) < 16


def test_batch_fields_are_annotated_as_host_or_device_arrays():
    """A placed batch (global_batch, place_batch, eval) holds jax.Arrays in the same pytree; the
    fields were annotated as NumPy arrays only, so typed code building one needed an ignore."""
    import typing

    import jax

    from taskpgm_jax.data import Batch

    hints = typing.get_type_hints(Batch, localns={"jax": jax})
    for field in Batch._fields:
        assert set(typing.get_args(hints[field])) == {np.ndarray, jax.Array}, field


@pytest.mark.parametrize("separator", [1, None, b" ", [" "]])
def test_a_separator_that_is_not_text_is_named(tokenizer, separator):
    """A non-string separator raised a raw TypeError ('can only concatenate str (not "int") to
    str') from the prompt concatenation; each encoder now names the argument."""
    rows = [{"prompt": "a", "target": "b", "choices": []}]
    match = rf"separator must be a string .*, got {type(separator).__name__}"
    for call in (lambda: encode_example(tokenizer, "a", "b", separator=separator),
                 lambda: encode_prompt(tokenizer, "a", separator=separator),
                 lambda: encode_choices(tokenizer, "a", ["b", "c"], separator=separator),
                 lambda: encode_task(tokenizer, rows, separator=separator)):
        with pytest.raises(DataError, match=match):
            call()
