"""`evaluate(model, tokenizer, tasks)`: a held-out suite scored the way the paper scores it.

Multiple-choice tasks: log-likelihood of every choice given the prompt, in static-shape batches
of one row per choice; accuracy by the summed and by the length-normalised log-likelihood.
Generative tasks: batched greedy decoding with the KV cache from left-padded prompts, cut at EOS
or a stop string, exact match after normalisation (strip, case, whitespace).
A task whose `metric` is none of these (BIG-bench's "bleu", "rougeLsum", ...) is refused
(`EVAL_METRICS`), never scored with another metric under its name.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import jax.numpy as jnp
import numpy as np
from flax import nnx

from taskpgm_jax.data import (
    Batch, Encoded, TaskPool, check_batch_values, encode_choices, encode_prompt, pad_batch,
)
from taskpgm_jax.data.tasks import DataError, check_int, check_names, choice_scores_problem
from taskpgm_jax.eval._multihost import to_host
from taskpgm_jax.eval.metrics import choice_predictions, cut_at_stop, exact_match, macro_mean
from taskpgm_jax.eval.score import _vocab_size, token_logprobs
from taskpgm_jax.models import CausalLM, greedy_generator

if TYPE_CHECKING:  # transformers is imported where a tokenizer is loaded, never with this module
    from transformers import PreTrainedTokenizerBase


class EvalResult(NamedTuple):
    """per_task: name -> {"metric", "value", "count", "truncated", "predictions", ...}, where
    `truncated` counts the examples whose prompt was cut from the left to fit `seq_len`;
    aggregate: the macro mean of the per-task values over `num_tasks` tasks and
    `num_examples` examples in all."""

    per_task: dict[str, dict[str, Any]]
    aggregate: float
    num_tasks: int
    num_examples: int


@nnx.jit
def _row_loglik(model, batch: Batch):
    logits = model(batch.input_ids, segment_ids=batch.segment_ids, positions=batch.positions)
    mask = batch.loss_mask
    # where: a target under padding may gather NaN (HF's -100), and 0 * NaN is NaN.
    lp = jnp.where(mask > 0, token_logprobs(logits, batch.targets) * mask, 0.0)
    return jnp.sum(lp, axis=-1), jnp.sum(batch.loss_mask, axis=-1)


# The metrics `evaluate` computes, by task kind, with the names other sources give the same
# computation: BIG-bench's generative preferred_score "exact_str_match" is scored as this module's
# exact match (after normalisation, so a case or whitespace difference still counts as a hit).
EVAL_METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("multiple_choice_grade",),
    "generate": ("exact_match", "exact_str_match"),
}


def _check_examples(examples) -> list:
    if isinstance(examples, (str, bytes, Mapping)):
        # A dict of columns would be read as its keys, a string as its characters.
        raise DataError(f"examples: expected a list of example dicts (or a datasets.Dataset), "
                        f"got one {type(examples).__name__}; pass one dict per example")
    examples = list(examples)
    if not examples:
        raise ValueError("examples: no examples to score.")
    return examples


def _check_choice_example(ex: Any, k: int) -> None:
    """The rules `make_task` applies to a multiple-choice row, as a `DataError` naming
    `examples[k]` and the field: a bad row would otherwise score silently wrong (an answer given
    as text never equals the int prediction, an empty choice scores log-likelihood 0 and always
    wins, one string is scored as its characters)."""
    at = f"examples[{k}]"
    if not isinstance(ex, Mapping):
        raise DataError(f"{at}: expected a dict with 'prompt', 'choices' and 'answer', got "
                        f"{type(ex).__name__}")
    for field in ("prompt", "choices", "answer"):
        if field not in ex or ex[field] is None:
            raise DataError(f"{at}: missing {field!r}; a multiple-choice example needs "
                            f"'prompt', 'choices' and 'answer' (the 0-based index of the correct "
                            f"choice)")
    if not isinstance(ex["prompt"], str):
        raise DataError(f"{at}['prompt']: expected a string, got {type(ex['prompt']).__name__}")
    choices = ex["choices"]
    if isinstance(choices, str):
        raise DataError(f"{at}['choices']: one string {choices!r}, which would be scored as its "
                        f"characters; pass a list of choice strings")
    if not isinstance(choices, (Sequence, np.ndarray)) or \
            not all(isinstance(c, str) for c in choices):
        raise DataError(f"{at}['choices']: expected a list of strings, got {choices!r}")
    if len(choices) < 2:
        raise DataError(f"{at}['choices']: a multiple-choice example needs at least 2 choices, "
                        f"got {len(choices)}")
    first: dict[str, int] = {}
    for j, c in enumerate(choices):
        if c == "":
            raise DataError(f"{at}['choices']: choice {j} is empty: it has no tokens to score "
                            f"(log-likelihood 0), so it would always win; remove it or give it "
                            f"text")
        if c in first:
            raise DataError(f"{at}['choices']: choices {first[c]} and {j} are both {c!r}: the "
                            f"answer is ambiguous; make the choices distinct")
        first[c] = j
    answer = ex["answer"]
    if isinstance(answer, str):
        if answer in first:
            raise DataError(f"{at}['answer']: {answer!r} is a choice text; pass its index "
                            f"(0-based) into choices: {first[answer]}")
        raise DataError(f"{at}['answer']: {answer!r} is not among the choices "
                        f"{list(choices)!r}; pass the 0-based index of the correct choice")
    if isinstance(answer, bool) or not isinstance(answer, numbers.Integral):
        raise DataError(f"{at}['answer']: expected the 0-based index (an int) of the correct "
                        f"choice, got {answer!r}")
    if not 0 <= int(answer) < len(choices):
        raise DataError(f"{at}['answer']: {answer} is not an index into its {len(choices)} "
                        f"choices; pass a 0-based index in [0, {len(choices)})")
    scores = ex.get("choice_scores")
    if scores is not None and (not isinstance(scores, (Sequence, np.ndarray)) or len(scores)):
        problem = choice_scores_problem(scores, len(choices), int(answer))
        if problem:
            raise DataError(f"{at}['choice_scores']: {problem}")


def _choice_credit(ex: Mapping[str, Any]) -> list[float]:
    """The credit of each choice of a checked row: its `choice_scores` (BIG-bench's
    target_scores), else 1 for the answer and 0 for the others."""
    scores = ex.get("choice_scores")
    if scores is None or len(scores) == 0:
        return [float(j == int(ex["answer"])) for j in range(len(ex["choices"]))]
    return [float(v) for v in scores]


def _generation_references(ex: Any, k: int) -> list[str]:
    """The references a generative row is scored against, by `make_task`'s rules (`references`
    one string or a list of strings; absent or empty: [target]), or a `DataError` naming
    `examples[k]` and the field: one string passed through `list` would be scored as its
    characters, and a missing field or a prompt that is not text would fail deep inside."""
    at = f"examples[{k}]"
    if not isinstance(ex, Mapping):
        raise DataError(f"{at}: expected a dict with 'prompt' and 'references' (or 'target'), "
                        f"got {type(ex).__name__}")
    if not isinstance(ex.get("prompt"), str):
        raise DataError(f"{at}['prompt']: expected a string, got {ex.get('prompt')!r}")
    refs = ex.get("references")
    field = "references"
    if isinstance(refs, str):
        refs = [refs]
    elif refs is None or (isinstance(refs, (Sequence, np.ndarray)) and len(refs) == 0):
        if not isinstance(ex.get("target"), str):
            raise DataError(f"{at}: no 'references' and no 'target' string to score against, "
                            f"got target {ex.get('target')!r}; give the acceptable answers")
        refs, field = [ex["target"]], "target"
    if not isinstance(refs, (Sequence, np.ndarray)) or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{at}['references']: expected a string or a list of strings, got "
                        f"{refs!r}")
    blank = [r for r in refs if not r.strip()]
    if blank:  # exact match strips: an empty prediction would score as correct
        raise DataError(f"{at}[{field!r}]: {blank[0]!r} is empty or blank: it would match an "
                        f"empty prediction; remove it or give the answer text")
    return list(refs)


def unscored_tasks(tasks: TaskPool) -> list:
    """The tasks of `tasks` whose metric `evaluate` does not compute (`EVAL_METRICS`)."""
    return [t for t in tasks.tasks if t.metric not in EVAL_METRICS.get(t.kind, ())]


def _check_metrics(tasks: TaskPool) -> None:
    """Refuses tasks whose metric `evaluate` does not compute, all named at once, before any
    scoring."""
    bad = [f"{t.name!r} ({t.kind}) asks for {t.metric!r}" for t in unscored_tasks(tasks)]
    if bad:
        supported = "; ".join(f"{kind} tasks: {', '.join(map(repr, names))}"
                              for kind, names in EVAL_METRICS.items())
        raise DataError(
            f"tasks: evaluate cannot compute the metric of {len(bad)} task(s): "
            f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}. It computes, for "
            f"{supported}. Leave those tasks out (tasks.select(...)) or rebuild them with a "
            f"supported metric (make_task(..., metric=...)).")


def choice_logliks(model: nnx.Module, rows: Sequence[Encoded], *, seq_len: int,
                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed target log-likelihood and target-token count of each encoded row, in order.

    Rows are scored `batch_size` at a time, padded to `seq_len` (one compiled shape). A
    `CausalLM`'s ids are checked against its vocabulary first (ValueError): under jit an
    out-of-range id would be clipped, or give NaN as a target. No rows give two empty arrays."""
    check_int(seq_len, "seq_len", 1)
    check_int(batch_size, "batch_size", 1)
    sums, counts = [np.zeros(0, np.float32)], [np.zeros(0, np.float32)]
    # The model's graph is walked once, not per batch (nnx.jit's walk cost ~6 ms a call here on a
    # 4-layer model, twice the forward itself).
    row_loglik = nnx.cached_partial(_row_loglik, model)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = pad_batch(chunk, seq_len, batch_size)
        check_batch_values(batch, _vocab_size(model), f"rows[{start}:{start + len(chunk)}]")
        s, c = row_loglik(jax_batch(batch))
        # to_host: under jax.set_mesh on several processes the rows come back split over them.
        sums.append(to_host(s)[:len(chunk)])
        counts.append(to_host(c)[:len(chunk)])
    return np.concatenate(sums), np.concatenate(counts)


def jax_batch(batch: Batch) -> Batch:
    # A Batch is a pytree: the same fields as device arrays.
    return Batch(*(jnp.asarray(x) for x in batch))


def score_multiple_choice(model: nnx.Module, tokenizer: PreTrainedTokenizerBase,
                          examples: Iterable[Mapping[str, Any]], *, seq_len: int,
                          batch_size: int, separator: str = "") -> dict[str, Any]:
    """BIG-bench's multiple_choice_grade of a multiple-choice split (rows with `prompt`,
    `choices`, `answer`, optionally `choice_scores`): the mean over examples of the chosen
    choice's score, which with one correct choice (the default scores) is the accuracy.

    Every row is checked first (`DataError` naming `examples[k]` and the field): `choices` a
    list of 2+ distinct non-empty strings, `answer` the 0-based int index of the correct one,
    `choice_scores` (when given) one finite number per choice with the answer's the highest."""
    examples = _check_examples(examples)
    for k, ex in enumerate(examples):
        _check_choice_example(ex, k)
    rows, ends, truncated = [], [], 0
    for k, ex in enumerate(examples):
        enc = encode_choices(tokenizer, ex["prompt"], ex["choices"], max_length=seq_len,
                             separator=separator, example=k)
        rows.extend(enc)
        ends.append(len(rows))  # example k's choices are rows[ends[k-1]:ends[k]]
        truncated += any(e.truncated for e in enc)
    sums, counts = choice_logliks(model, rows, seq_len=seq_len, batch_size=batch_size)
    correct = correct_norm = 0.0
    predictions = []
    for k, ex in enumerate(examples):
        rows_k = slice(ends[k - 1] if k else 0, ends[k])
        pick, pick_norm = choice_predictions(sums[rows_k], counts[rows_k])
        predictions.append(pick)
        # BIG-bench's multiple_choice_grade: the chosen choice's score (1 or 0 with one answer).
        credit = _choice_credit(ex)
        correct += credit[pick]
        correct_norm += credit[pick_norm]
    n = len(predictions)
    return {"metric": "multiple_choice_grade", "value": correct / n,
            "accuracy_length_normalised": correct_norm / n, "count": n,
            "truncated": truncated, "predictions": predictions}


def generate_texts(model: CausalLM, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                   prompt_len: int, max_new_tokens: int, batch_size: int,
                   stop: Sequence[str] = (), separator: str = "") -> list[str]:
    """Greedy continuations of `prompts`, `batch_size` at a time, each cut at EOS and at the
    first stop string. Each prompt is `prompt + separator` tokenized as in training
    (`data.encode_prompt`: a long prompt loses its left, never its BOS), left-padded to
    `prompt_len`."""
    prompts = check_names(prompts, "prompts")
    return _generate(model, tokenizer, prompts, prompt_len=prompt_len,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop,
                     separator=separator)[0]


def _generate(model, tokenizer, prompts, *, prompt_len, max_new_tokens, batch_size, stop,
              separator) -> tuple[list[str], int]:
    """`generate_texts` and the number of prompts that were cut to fit."""
    check_int(prompt_len, "prompt_len", 1)
    check_int(max_new_tokens, "max_new_tokens", 1)
    check_int(batch_size, "batch_size", 1)
    stop = check_names(stop, "stop", nonempty=True)
    eos = tokenizer.eos_token_id
    out, truncated = [], 0
    generate = greedy_generator(model)  # the model's graph walked once, not per batch
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = np.zeros((batch_size, prompt_len), np.int32)
        mask = np.zeros((batch_size, prompt_len), np.int32)
        for r, text in enumerate(chunk):
            toks, cut = encode_prompt(tokenizer, text, max_length=prompt_len,
                                      separator=separator)
            truncated += cut > 0
            ids[r, prompt_len - len(toks):] = toks
            mask[r, prompt_len - len(toks):] = 1
        mask[len(chunk):, -1] = 1  # filler rows: one token, so no row is empty
        gen = to_host(generate(jnp.asarray(ids), jnp.asarray(mask),
                               max_new_tokens=max_new_tokens, eos_token_id=eos))
        for row in gen[:len(chunk)]:
            row = row.tolist()
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            out.append(cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop))
    return out, truncated


def score_generation(model: CausalLM, tokenizer: PreTrainedTokenizerBase,
                     examples: Iterable[Mapping[str, Any]], *, prompt_len: int,
                     max_new_tokens: int, batch_size: int, stop: Sequence[str] = (),
                     separator: str = "") -> dict[str, Any]:
    """Exact match of a generative split (rows with `prompt`, `target`, `references`).

    Every row is checked first (`DataError` naming `examples[k]` and the field), by `make_task`'s
    rules: `prompt` a string; `references` one string or a list of strings, or absent / empty
    for [`target`]; none of them empty or blank (an empty prediction would match it)."""
    examples = _check_examples(examples)
    references = [_generation_references(ex, k) for k, ex in enumerate(examples)]
    preds, truncated = _generate(model, tokenizer, [ex["prompt"] for ex in examples],
                                 prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, stop=stop, separator=separator)
    hits = [exact_match(p, refs) for p, refs in zip(preds, references, strict=True)]
    return {"metric": "exact_match", "value": float(np.mean(hits)), "count": len(hits),
            "truncated": truncated, "predictions": preds}


def evaluate(model: nnx.Module, tokenizer: PreTrainedTokenizerBase, tasks: TaskPool, *,
             split: str = "eval", seq_len: int = 256, batch_size: int = 8,
             max_new_tokens: int = 32, stop: Sequence[str] = ("\n",),
             separator: str = "") -> EvalResult:
    """Scores every task of `tasks` on its `split` and the macro mean over tasks.

    Args:
      model: a `CausalLM`. Multiple-choice tasks use only its call,
        `model(input_ids, attention_mask=...)` -> float32 logits, so any module with that call
        scores them; generative tasks decode with the `CausalLM`'s KV cache (`TypeError`
        otherwise).
      tokenizer: the model's tokenizer.
      tasks: a `TaskPool`; its `split` of each task is scored.
      split: "eval" (held-out) by default.
      seq_len: static row length for choice scoring, and the prompt length for generation.
      batch_size: static batch size.
      max_new_tokens: generation budget per prompt.
      stop: stop strings for generation (the text is cut at the first).
      separator: text between prompt and answer, as used in training (appended to choice and
        generation prompts alike).

    On several processes (a pod slice) every process calls `evaluate` with the same arguments:
    each batch is one SPMD computation over the model's mesh, and every process gets the whole
    result (outputs split over the processes, as under `jax.set_mesh`, are gathered).

    Returns:
      An `EvalResult` with per-task metrics and counts and the macro-mean aggregate.

    Raises:
      ValueError: `tasks` is not a `TaskPool` or has no tasks, a task has no examples in
        `split`, or a task's `metric` is not one `evaluate` computes (`EVAL_METRICS`:
        "multiple_choice_grade" for multiple-choice tasks, "exact_match" or BIG-bench's
        "exact_str_match" for generative ones); bad arguments.
    """
    if not isinstance(tasks, TaskPool):
        raise ValueError(f"tasks: expected a TaskPool, got {type(tasks).__name__}.")
    if len(tasks) == 0:
        raise ValueError("tasks: the pool has no tasks to evaluate; pass a TaskPool with at "
                         "least one task (e.g. the held-out suite).")
    _check_metrics(tasks)
    check_int(seq_len, "seq_len", 2)
    check_int(batch_size, "batch_size", 1)
    check_int(max_new_tokens, "max_new_tokens", 1)
    if not isinstance(separator, str):
        raise ValueError(f"separator: expected a string, got {type(separator).__name__}.")
    stop = check_names(stop, "stop", nonempty=True)
    per_task = {}
    for name in tasks.names:
        examples = tasks.split(name, split)
        if len(examples) == 0:
            raise ValueError(f"tasks: task {name!r} has no examples in its {split!r} split.")
        if tasks[name].kind == "multiple_choice":
            per_task[name] = score_multiple_choice(model, tokenizer, examples, seq_len=seq_len,
                                                   batch_size=batch_size, separator=separator)
        else:
            # Generation needs a CausalLM's KV cache ("KV-cache support" above); the model is
            # passed on as it is (a module without it fails there).
            per_task[name] = score_generation(cast(CausalLM, model), tokenizer, examples,
                                              prompt_len=seq_len, max_new_tokens=max_new_tokens,
                                              batch_size=batch_size, stop=stop,
                                              separator=separator)
    return EvalResult(per_task, macro_mean({k: v["value"] for k, v in per_task.items()}),
                      len(per_task), sum(v["count"] for v in per_task.values()))
