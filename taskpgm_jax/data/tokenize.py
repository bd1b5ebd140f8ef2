"""Tokenization: examples -> token ids with a target-only mask; tokenizers from local directories.

The prompt and the target are tokenized separately and concatenated, so the boundary between
them is exact (a joint tokenization can merge the prompt's last characters with the target's
first into one token, and then that token is neither prompt nor target). The paper's recipe
(`inputs + " " + targets`) is reproduced by ending prompts with a space or passing `separator`.

Truncation keeps the target: the prompt is cut from the left (its end, nearest the answer, is
what matters), keeping a leading BOS token when the tokenizer adds one. Only when the target alone
is longer than the limit is the target cut, from the right, and its EOS dropped.

Every row keeps at least one token before its target, because the loss on a token is taken at the
position before it: with no such token the first target token would silently get no loss. An empty
prompt gets the tokenizer's BOS token (an error if it has none), and a target cut to fit keeps one
context token (the BOS, else the prompt's last token).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from taskpgm_jax.data.tasks import DataError

if TYPE_CHECKING:  # transformers (and tokenizers) are imported where a tokenizer is made
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Encoded", "encode_choices", "encode_example", "encode_task", "load_tokenizer",
    "train_byte_bpe",
]


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized sequence.

    Attributes:
      input_ids: int32 [length], prompt tokens then target tokens (then EOS).
      target_mask: bool [length], True on target tokens (and the EOS): the tokens the loss and
        the log-likelihood are taken on.
      example: index of the source example (row in the split it came from).
      choice: for multiple-choice scoring rows, the choice index; -1 otherwise.
      truncated: how many prompt tokens were cut from the left (plus target tokens cut, if any).
    """

    input_ids: np.ndarray
    target_mask: np.ndarray
    example: int = -1
    choice: int = -1
    truncated: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# What AutoTokenizer reads: the fast tokenizer, its config, or a slow tokenizer's vocabulary
# (sentencepiece, BPE, WordPiece, Mistral tekken, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.json", "merges.txt", "vocab.txt", "tekken.json")


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Loads any `transformers.AutoTokenizer` from a local directory (never the hub).

    Args:
      path: a directory written by `save_pretrained` (tokenizer.json / tokenizer_config.json).

    Returns:
      The tokenizer. A missing pad token is set to the EOS token (right padding is ours anyway).
    """
    from transformers import AutoTokenizer

    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"load_tokenizer: path must be a directory (str or os.PathLike), got "
                         f"{type(path).__name__}")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"load_tokenizer: {path} is not a directory; pass a local directory "
                         "written by save_pretrained (hub names are not fetched here)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:
        # Without any of these transformers guesses a slow tokenizer class and says
        # "sentencepiece or tiktoken" is missing, which sends the user the wrong way.
        if not any(n in TOKENIZER_FILES or n.endswith(".tiktoken") for n in os.listdir(path)):
            raise ValueError(
                f"load_tokenizer: no tokenizer files ({', '.join(TOKENIZER_FILES)}, *.tiktoken) "
                f"in {path}; pass a directory written by the tokenizer's save_pretrained") from None
        raise
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def train_byte_bpe(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 512,
                   min_frequency: int = 2) -> PreTrainedTokenizerBase:
    """Trains a small byte-level BPE tokenizer and saves it as a standard tokenizer directory.

    Args:
      texts: training text (for example every prompt and target of a synthetic suite).
      out_dir: where to save; `load_tokenizer(out_dir)` and `AutoTokenizer` load it.
      vocab_size: target vocabulary size, including the 256 byte symbols and 3 special tokens.
      min_frequency: minimum pair count for a merge.

    Returns:
      The loaded `transformers` tokenizer (`<|pad|>` id 0, `<|bos|>` 1, `<|eos|>` 2). It prepends
      `<|bos|>` when called with `add_special_tokens=True` (as Llama tokenizers do), and
      `decode(..., skip_special_tokens=True)` drops it again.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prompt's first word and a target's first word must tokenize the
    # same way whether they start the text or not.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  show_progress=False,
                                  special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # A BOS on every prompt gives the first target token a position to be predicted from even
    # when the prompt is empty or cut away; saved in tokenizer.json, so AutoTokenizer keeps it.
    bos = tok.token_to_id(specials[1])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{specials[1]} $A", pair=f"{specials[1]} $A $B:1",
        special_tokens=[(specials[1], bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=specials[0],
                                   bos_token=specials[1], eos_token=specials[2])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _check_separator(separator: Any) -> str:
    """`separator` itself, or a `DataError` naming it (`prompt + separator` would raise a raw
    TypeError)."""
    if not isinstance(separator, str):
        raise DataError(f"separator must be a string (text appended to every prompt, e.g. \" \"; "
                        f"\"\" for none), got {type(separator).__name__} {separator!r}")
    return separator


def _assemble(prompt_ids: list[int], target_ids: list[int], max_length: int | None,
              keep_first: bool) -> tuple[list[int], list[int], int]:
    """Concatenates prompt and target, cutting the prompt from the left to fit."""
    cut = 0
    if max_length is not None and len(prompt_ids) + len(target_ids) > max_length:
        head = prompt_ids[:1] if keep_first and prompt_ids else []
        body = prompt_ids[len(head):]
        room = max_length - len(target_ids) - len(head)
        # room == 0 without a head would leave no token before the target (its first token
        # unscored): that case cuts the target instead, below.
        if room > 0 or (room == 0 and (head or not target_ids)):
            cut = len(body) - room
            prompt_ids = head + body[cut:]
        else:  # the target alone does not fit: the target is cut from the right
            # Keep one token before the target (the BOS, else the prompt's last token, nearest
            # the answer): it is the position the first target token is predicted from.
            if target_ids and not head:
                head = prompt_ids[-1:]
            cut = len(prompt_ids) - len(head) + len(target_ids) - (max_length - len(head))
            prompt_ids = head
            target_ids = target_ids[:max_length - len(head)]
    return prompt_ids, target_ids, cut


def _lead(tokenizer, prompt_ids: list[int], what: str) -> list[int]:
    """The prompt ids, or [BOS] for an empty prompt: a row needs a token before its target."""
    if prompt_ids:
        return prompt_ids
    if tokenizer.bos_token_id is None:
        raise DataError(
            f"{what}: empty prompt and the tokenizer has no BOS token, so no position would "
            f"predict the first target token (it would get no loss and no score); give the "
            f"example a prompt, pass a separator, or use a tokenizer with a BOS token")
    return [tokenizer.bos_token_id]


def encode_example(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, *,
                   max_length: int | None = None, add_eos: bool = True, separator: str = "",
                   example: int = -1, choice: int = -1) -> Encoded:
    """Tokenizes one (prompt, target) pair with the loss mask on the target only.

    Args:
      tokenizer: a `transformers` tokenizer; its special tokens (BOS) go on the prompt.
      prompt: the input text.
      target: the text to learn / score.
      max_length: the longest sequence allowed (at least 2); the prompt is cut from the left to
        fit, and a target longer than that is cut from the right after one context token.
      add_eos: append the EOS token to the target (so the model learns to stop). Scoring rows
        for multiple choice usually pass False.
      separator: text appended to the prompt (e.g. " " for the paper's `inputs + " " + targets`).
      example, choice: bookkeeping copied into the result.

    Returns:
      An `Encoded`.

    Raises:
      DataError: an empty prompt (with the separator) and a tokenizer without a BOS token, or a
        separator that is not a string.

    Example:
      >>> enc = encode_example(tok, "add 2+3 = ", "5", max_length=32)
      >>> tok.decode(enc.input_ids[enc.target_mask])   # '5<|eos|>'
    """
    separator = _check_separator(separator)
    return _build(tokenizer, _ids(tokenizer, prompt + separator, special=True),
                  _ids(tokenizer, target, special=False), max_length, add_eos, example, choice)


def _build(tokenizer, prompt_ids: list[int], target_ids: list[int], max_length: int | None,
           add_eos: bool, example: int, choice: int) -> Encoded:
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one context token and one target "
                         f"token), got {max_length}")
    target_ids = list(target_ids)
    where = (f"example {example}" if example >= 0 else "this example") + (
        f" choice {choice}" if choice >= 0 else "")
    prompt_ids = _lead(tokenizer, list(prompt_ids), where)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no EOS token")
        target_ids.append(tokenizer.eos_token_id)
    keep_first = (tokenizer.bos_token_id is not None and bool(prompt_ids)
                  and prompt_ids[0] == tokenizer.bos_token_id)
    p, t, cut = _assemble(prompt_ids, target_ids, max_length, keep_first)
    ids = np.asarray(p + t, dtype=np.int32)
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(p):] = True
    return Encoded(ids, mask, example=example, choice=choice, truncated=cut)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, *, max_length: int | None = None,
                  separator: str = "") -> tuple[list[int], int]:
    """A generation prompt tokenized exactly as training rows tokenize theirs: `prompt +
    separator` with the special tokens, cut from the left to `max_length` keeping a leading BOS;
    an empty prompt is [BOS], as in training rows.

    Returns:
      (token ids, number of prompt tokens cut).

    Raises:
      DataError: an empty prompt and a tokenizer without a BOS token.
    """
    separator = _check_separator(separator)
    ids = _lead(tokenizer, _ids(tokenizer, prompt + separator, special=True), "generation prompt")
    keep_first = (tokenizer.bos_token_id is not None and bool(ids)
                  and ids[0] == tokenizer.bos_token_id)
    ids, _, cut = _assemble(ids, [], max_length, keep_first)
    return ids, cut


def encode_choices(tokenizer: PreTrainedTokenizerBase, prompt: str, choices: Sequence[str], *,
                   max_length: int | None = None, add_eos: bool = False, separator: str = "",
                   example: int = -1) -> list[Encoded]:
    """One row per choice, for multiple-choice log-likelihood scoring.

    Every row shares the prompt and masks its own choice, so log p(choice | prompt) is the sum
    of the model's log-probs over that row's target tokens.

    Returns:
      A list of `Encoded` with `choice` set to 0, 1, ...
    """
    separator = _check_separator(separator)
    return [encode_example(tokenizer, prompt, c, max_length=max_length, add_eos=add_eos,
                           separator=separator, example=example, choice=i)
            for i, c in enumerate(choices)]


def encode_task(tokenizer: PreTrainedTokenizerBase, examples: Iterable[Mapping[str, Any]], *,
                max_length: int | None = None, mode: Literal["train", "choices"] = "train",
                add_eos: bool | None = None, separator: str = "") -> list[Encoded]:
    """Encodes a split (any iterable of rows with the task columns).

    Args:
      tokenizer: a `transformers` tokenizer.
      examples: rows with `prompt`, `target`, `choices` (e.g. `pool.train(name)`).
      max_length: per-sequence limit.
      mode: "train": one row per example, target = the target text (for multiple choice the
        correct choice); "choices": one row per choice of every multiple-choice example
        (generative examples give one row), for log-likelihood scoring.
      add_eos: default True in "train" mode and False in "choices" mode.
      separator: see `encode_example`.

    Returns:
      A list of `Encoded`, with `example` the row index in `examples`.
    """
    if mode not in ("train", "choices"):
        raise ValueError(f"mode must be 'train' or 'choices', got {mode!r}")
    separator = _check_separator(separator)
    add_eos = (mode == "train") if add_eos is None else add_eos
    # Tokenize every prompt and every target in two batched calls (the fast tokenizer runs them
    # in Rust), then assemble the rows.
    jobs: list[tuple[int, int, int, str]] = []  # (example, choice, prompt slot, target text)
    prompts: list[str] = []
    for i, ex in enumerate(examples):
        prompts.append(ex["prompt"] + separator)
        if mode == "choices" and len(ex["choices"]):
            jobs.extend((i, c, len(prompts) - 1, text) for c, text in enumerate(ex["choices"]))
        else:
            jobs.append((i, -1, len(prompts) - 1, ex["target"]))
    if not jobs:
        return []
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    t_ids = tokenizer([j[3] for j in jobs], add_special_tokens=False)["input_ids"]
    return [_build(tokenizer, p_ids[slot], t, max_length, add_eos, i, c)
            for (i, c, slot, _), t in zip(jobs, t_ids, strict=True)]
