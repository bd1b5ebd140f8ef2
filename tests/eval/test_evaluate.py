"""Held-out evaluation: choice log-likelihoods against a NumPy bigram reference, a hand-built
multiple-choice case, and greedy exact match against cache-free recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import log_softmax

from taskpgm_jax.data import (SplitSpec, TaskPool, encode_choices, encode_example, encode_prompt,
                              make_task, train_byte_bpe)
from taskpgm_jax.eval import (choice_logliks, choice_predictions, cut_at_stop, evaluate,
                              exact_match, generate_texts, macro_mean, normalize_text,
                              score_generation, score_multiple_choice)
from taskpgm_jax.models import ModelConfig
from tests.models.conftest import random_model

WORDS = ["yes", "no", "maybe", "red", "green", "blue", "one", "two", "three", "cat", "dog"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [" ".join(WORDS)] * 4 + [f"question {w}? answer {v}" for w in WORDS for v in WORDS]
    return train_byte_bpe(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


class Bigram(nnx.Module):
    """Logits of the next token depend on the current token only: table[token]."""

    def __init__(self, table):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))

    def __call__(self, input_ids, attention_mask=None, *, segment_ids=None, positions=None):
        return self.table[...][input_ids]


def _reference_loglik(table, tokenizer, prompt, choice):
    ids = tokenizer(prompt)["input_ids"]
    choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
    logp = log_softmax(np.asarray(table, np.float64), axis=-1)
    seq = ids + choice_ids
    return sum(logp[seq[t - 1], seq[t]] for t in range(len(ids), len(seq))), len(choice_ids)


def test_multiple_choice_scores_equal_the_bigram_reference(tokenizer, rng):
    v = len(tokenizer)
    table = rng.normal(size=(v, v)) * 2
    model = Bigram(table)
    examples = []
    for _ in range(5):
        prompt = f"question {rng.choice(WORDS)}? answer "
        choices = list(rng.choice(WORDS, size=3, replace=False))
        examples.append({"prompt": prompt, "choices": choices, "answer": int(rng.integers(3))})
    out = score_multiple_choice(model, tokenizer, examples, seq_len=16, batch_size=4)
    correct = correct_norm = 0
    for ex, pred in zip(examples, out["predictions"], strict=True):
        ref = [_reference_loglik(table, tokenizer, ex["prompt"], c) for c in ex["choices"]]
        pick, pick_norm = choice_predictions(*map(np.asarray, zip(*ref, strict=True)))
        assert pred == pick
        correct += pick == ex["answer"]
        correct_norm += pick_norm == ex["answer"]
    assert out["value"] == correct / 5 and out["count"] == 5
    assert out["accuracy_length_normalised"] == correct_norm / 5


def test_hand_built_case_picks_the_right_answer(tokenizer):
    """A model that strongly predicts the tokens of "green" after anything picks "green"."""
    v = len(tokenizer)
    table = np.zeros((v, v))
    for tok in tokenizer("green", add_special_tokens=False)["input_ids"]:
        table[:, tok] = 8.0
    examples = [{"prompt": "question colour? answer ", "choices": ["red", "green", "blue"],
                 "answer": 1},
                {"prompt": "question grass? answer ", "choices": ["green", "dog"], "answer": 0}]
    out = score_multiple_choice(Bigram(table), tokenizer, examples, seq_len=16, batch_size=4)
    assert out["predictions"] == [1, 0] and out["value"] == 1.0


def _tiny_lm(vocab, rng):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=8, dtype=jnp.float32)
    return random_model(cfg, seed=int(rng.integers(2**31)), std=0.5)


_full = nnx.jit(lambda model, ids: model(ids))


def _greedy_without_cache(model, tokenizer, prompt, steps):
    ids = list(tokenizer(prompt)["input_ids"])
    out = []
    for _ in range(steps):
        padded = np.zeros((1, 24), np.int32)
        padded[0, :len(ids)] = ids  # causal: the padding after the prompt changes nothing
        nxt = int(np.argmax(np.asarray(_full(model, jnp.asarray(padded)))[0, len(ids) - 1]))
        if nxt == tokenizer.eos_token_id:
            break
        ids.append(nxt)
        out.append(nxt)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_generation_and_evaluate_match_recomputation(tokenizer, rng):
    model = _tiny_lm(len(tokenizer), rng)
    prompts = [f"question {w}? answer " for w in WORDS[:5]]
    with jax.default_matmul_precision("highest"):
        got = generate_texts(model, tokenizer, prompts, prompt_len=12, max_new_tokens=6,
                             batch_size=4)
        ref = [_greedy_without_cache(model, tokenizer, p, 6) for p in prompts]
    assert got == ref
    # evaluate(): a generative task whose references are the model's own output for the first
    # three prompts (hits) and something else for the last two (misses), and a choice task.
    rows = [{"prompt": p, "target": (r if k < 3 else "zebra") or "zebra"}
            for k, (p, r) in enumerate(zip(prompts, ref, strict=True))]
    choice_rows = [{"prompt": f"pick {w} ", "choices": ["red", "blue"], "answer": 0}
                   for w in WORDS[:4]]
    pool = TaskPool([make_task("gen", "generate", rows),
                     make_task("mc", "multiple_choice", choice_rows)],
                    SplitSpec(probe=0.0, eval=1.0))
    with jax.default_matmul_precision("highest"):
        result = evaluate(model, tokenizer, pool, seq_len=12, batch_size=4, max_new_tokens=6,
                          stop=())
    gen = result.per_task["gen"]
    expect = np.mean([exact_match(got[k], [rows[k]["target"]]) for k in range(5)])
    assert gen["count"] == 5 and gen["value"] == pytest.approx(expect)
    assert result.per_task["mc"]["count"] == 4
    assert result.aggregate == pytest.approx((gen["value"] + result.per_task["mc"]["value"]) / 2)
    assert (result.num_tasks, result.num_examples) == (2, 9)
    assert gen["truncated"] == 0 and result.per_task["mc"]["truncated"] == 0
    # The separator of training goes on generation prompts too (as on choice prompts).
    bare = [p.rstrip() for p in prompts[:4]]
    with jax.default_matmul_precision("highest"):
        got = generate_texts(model, tokenizer, bare, prompt_len=12, max_new_tokens=6,
                             batch_size=4, separator=" ")
    assert got == ref[:4]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate(model, tokenizer, pool, batch_size=0)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        evaluate(model, tokenizer, pool, seq_len=1)
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings, not one string"):
        evaluate(model, tokenizer, pool, stop="\n")


class _CharTokenizer:
    """Characters a-z as ids 3.., with BOS (1) prepended like Llama's tokenizer."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ord(c) - ord("a") for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_long_generation_prompts_keep_their_bos():
    """Cut from the left to fit, as training rows are: the BOS stays, the oldest text goes."""
    tok = _CharTokenizer()
    ids, cut = encode_prompt(tok, "abcdef", max_length=4, separator="g")
    assert ids == [1, 3 + 4, 3 + 5, 3 + 6] and cut == 4  # BOS, e f g
    row = encode_example(tok, "abcdef", "x", max_length=5, separator="g", add_eos=False)
    assert ids == row.input_ids[:4].tolist()  # exactly the training row's prompt
    assert encode_prompt(tok, "ab", max_length=4) == ([1, 3, 4], 0)


def test_metric_helpers():
    assert normalize_text("  The  Answer\n") == "the answer"
    assert exact_match(" Yes ", ["no", "yes"]) and not exact_match("yes!", ["yes"])
    assert cut_at_stop("abc\ndef", ["\n"]) == "abc" and cut_at_stop("abc", ["x", ""]) == "abc"
    assert choice_predictions(np.array([-3.0, -4.0]), np.array([1, 4])) == (0, 1)
    assert macro_mean({"a": 1.0, "b": 0.0, "c": 0.5}) == 0.5
    with pytest.raises(ValueError, match="values"):
        macro_mean({})
    with pytest.raises(ValueError, match="tasks: expected a TaskPool"):
        evaluate(None, None, [])


def test_model_smaller_than_the_tokenizer_is_refused(tokenizer, rng):
    """Tokenizer ids >= the model's vocab_size: under jit inputs would be clipped and targets
    give NaN log-likelihoods (every choice NaN, choice 0 picked), so they are refused first."""
    rows = encode_choices(tokenizer, "question yes? answer ", ["green", "blue"])
    big = max(int(r.input_ids.max()) for r in rows)
    with pytest.raises(ValueError, match=rf"rows\[0:2\]\.input_ids: ids must lie in "
                                         rf"\[0, vocab_size={big}\), got {big}"):
        choice_logliks(_tiny_lm(big, rng), rows, seq_len=16, batch_size=4)
    sums, counts = choice_logliks(None, [], seq_len=16, batch_size=4)  # no rows, no scores
    assert sums.shape == counts.shape == (0,)


@pytest.mark.parametrize("call,match", [
    (lambda: exact_match("a", "abc"), r"references must be a list of strings, not one string"),
    (lambda: cut_at_stop("42 Quite: x", "Q:"), r"stop must be a list of strings, not one string"),
    (lambda: generate_texts(None, None, "abc", prompt_len=8, max_new_tokens=2, batch_size=2),
     "prompts must be a list of strings, not one string"),
    (lambda: generate_texts(None, None, ["a"], prompt_len=8, max_new_tokens=2, batch_size=2,
                            stop="Q:"), "stop must be a list of non-empty strings"),
    (lambda: generate_texts(None, None, ["a"], prompt_len=0, max_new_tokens=2, batch_size=1),
     "prompt_len must be >= 1, got 0"),
    (lambda: generate_texts(None, None, ["a"], prompt_len=4, max_new_tokens=2, batch_size=0),
     "batch_size must be >= 1, got 0"),
    (lambda: choice_logliks(None, [], seq_len=4, batch_size=0), "batch_size must be >= 1"),
    (lambda: choice_logliks(None, [], seq_len=4, batch_size=True), "batch_size must be an int"),
    (lambda: generate_texts(None, None, ["a"], prompt_len=8, max_new_tokens=2, batch_size=2,
                            stop=["Q:", ""]), r"stop must be a list of non-empty strings; not: \[''\]"),
    (lambda: score_generation(None, None, [], prompt_len=4, max_new_tokens=2, batch_size=1),
     "examples: no examples to score"),
    (lambda: score_multiple_choice(None, None, [], seq_len=4, batch_size=1),
     "examples: no examples to score"),
    # An empty or blank reference equals an empty prediction after normalisation: a model that
    # outputs nothing scored a hit.
    (lambda: exact_match("", ["yes", ""]), r"references: '' is empty or blank: it would match "
                                           r"an empty prediction"),
    (lambda: exact_match("", [" \n"]), r"references: ' \\n' is empty or blank"),
    (lambda: score_generation(None, None, [{"prompt": "a", "references": ["b"]},
                                           {"prompt": "c", "references": ["d", " "]}],
                              prompt_len=4, max_new_tokens=2, batch_size=1),
     r"examples\[1\]\['references'\]: ' ' is empty or blank"),
    (lambda: score_generation(None, None, [{"prompt": "c", "target": ""}],
                              prompt_len=4, max_new_tokens=2, batch_size=1),
     r"examples\[0\]\['target'\]: '' is empty or blank"),
])
def test_eval_helpers_refuse_bad_arguments_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _random_choice_examples(rng, n):
    examples = []
    for _ in range(n):
        choices = [str(c) for c in rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False)]
        examples.append({"prompt": f"question {rng.choice(WORDS)}? answer ", "choices": choices,
                         "answer": int(rng.integers(len(choices)))})
    return examples


# Rows `make_task` refuses; before, each scored silently wrong (an int prediction never equals a
# text answer or an index past the choices, an empty choice scores 0 and always wins, "yn" is two
# choices) or failed deep inside tokenization.
@pytest.mark.parametrize("corrupt,match", [
    (lambda ex: {**ex, "answer": ex["choices"][ex["answer"]]},
     r"\['answer'\]: '\w+' is a choice text; pass its index \(0-based\) into choices: {answer}"),
    (lambda ex: {**ex, "answer": len(ex["choices"]) + 3},
     r"\['answer'\]: \d+ is not an index into its {n} choices; pass a 0-based index in \[0, {n}\)"),
    (lambda ex: {**ex, "answer": -1}, r"\['answer'\]: -1 is not an index into its {n} choices"),
    (lambda ex: {**ex, "answer": float(ex["answer"])}, r"\['answer'\]: expected the 0-based index"),
    (lambda ex: {**ex, "answer": "zebra"}, r"\['answer'\]: 'zebra' is not among the choices"),
    (lambda ex: {**ex, "choices": [""] + ex["choices"], "answer": ex["answer"] + 1},
     r"\['choices'\]: choice 0 is empty: it has no tokens to score"),
    (lambda ex: {**ex, "choices": "yn", "answer": 0},
     r"\['choices'\]: one string 'yn', which would be scored as its characters"),
    (lambda ex: {**ex, "choices": ex["choices"] + ex["choices"][:1]},
     r"\['choices'\]: choices 0 and {n} are both"),
    (lambda ex: {**ex, "choices": ex["choices"][:1], "answer": 0},
     r"\['choices'\]: a multiple-choice example needs at least 2 choices, got 1"),
    (lambda ex: {k: v for k, v in ex.items() if k != "answer"}, r": missing 'answer'"),
    (lambda ex: {**ex, "choice_scores": [1.0] * (len(ex["choices"]) + 1)},
     r"\['choice_scores'\]: {n1} scores for {n} choices"),
    (lambda ex: {**ex, "choice_scores": [float(j != ex["answer"]) for j in range(len(ex["choices"]))]},
     r"\['choice_scores'\]: the answer \(choice {answer}\) scores 0.0, below the best 1.0"),
])
def test_multiple_choice_refuses_rows_make_task_refuses(tokenizer, rng, corrupt, match):
    """The bad row is named by its index, wherever it sits; nothing is scored before."""
    examples = _random_choice_examples(rng, 6)
    k = int(rng.integers(len(examples)))
    good = examples[k]
    examples[k] = corrupt(good)
    model = Bigram(rng.normal(size=(len(tokenizer), len(tokenizer))))
    pattern = rf"examples\[{k}\]" + match.format(answer=good["answer"], n=len(good["choices"]),
                                                   n1=len(good["choices"]) + 1)
    with pytest.raises(ValueError, match=pattern):
        score_multiple_choice(model, tokenizer, examples, seq_len=16, batch_size=4)


def test_multiple_choice_refuses_columns_and_accepts_numpy_answers(tokenizer, rng):
    examples = _random_choice_examples(rng, 3)
    columns = {f: [ex[f] for ex in examples] for f in examples[0]}
    with pytest.raises(ValueError, match=r"examples: expected a list of example dicts \(or a "
                                         r"datasets.Dataset\), got one dict"):
        score_multiple_choice(None, tokenizer, columns, seq_len=16, batch_size=4)
    # NumPy integer answers (a pandas or NumPy source) are indices like ints.
    table = rng.normal(size=(len(tokenizer), len(tokenizer)))
    as_np = [{**ex, "answer": np.int64(ex["answer"])} for ex in examples]
    got = score_multiple_choice(Bigram(table), tokenizer, as_np, seq_len=16, batch_size=4)
    picks = [int(np.argmax([_reference_loglik(table, tokenizer, ex["prompt"], c)[0]
                            for c in ex["choices"]])) for ex in examples]
    assert got["predictions"] == picks
    assert got["value"] == pytest.approx(np.mean([p == ex["answer"]
                                                  for p, ex in zip(picks, examples, strict=True)]))


def _bigbench_generative(preferred, inputs, targets):
    """A BIG-bench task.json with `preferred` as its preferred_score, through the converter
    (prompts "question <input>? answer ")."""
    from taskpgm_jax.data.sources.bigbench import convert_task

    data = {"preferred_score": preferred, "example_input_prefix": "question ",
            "example_output_prefix": "? answer ",
            "examples": [{"input": i, "target": t} for i, t in zip(inputs, targets, strict=True)]}
    return convert_task(data, f"bb_{preferred}", "test")


def test_evaluate_refuses_metrics_it_cannot_compute(tokenizer, rng):
    """A BIG-bench task preferring BLEU (or a choice task preferring macro F1) was scored with
    exact match / choice accuracy under its own name; now the pool is refused before any
    scoring. BIG-bench's exact_str_match is scored as exact match."""
    model = _tiny_lm(len(tokenizer), rng)
    inputs = [str(w) for w in rng.choice(WORDS, size=5, replace=False)]
    with jax.default_matmul_precision("highest"):
        preds = [_greedy_without_cache(model, tokenizer, f"question {w}? answer ", 6)
                 for w in inputs]
    # Hits for the first three (the model's own output), misses for the rest.
    targets = [(p if k < 3 else "zebra") or "zebra" for k, p in enumerate(preds)]
    exact = _bigbench_generative("exact_str_match", inputs, targets)
    mc = make_task("mc_f1", "multiple_choice", _random_choice_examples(rng, 4), metric="macro_f1")
    bad = TaskPool([_bigbench_generative("bleu", inputs, targets), exact, mc],
                   SplitSpec(probe=0.0, eval=1.0))
    with pytest.raises(ValueError, match=r"tasks: evaluate cannot compute the metric of 2 "
                                         r"task\(s\): 'bb_bleu' \(generate\) asks for 'bleu', "
                                         r"'mc_f1' \(multiple_choice\) asks for 'macro_f1'\. It "
                                         r"computes, for multiple_choice tasks: "
                                         r"'multiple_choice_grade'; generate tasks: "
                                         r"'exact_match', 'exact_str_match'"):
        evaluate(model, tokenizer, bad, seq_len=12, batch_size=4, max_new_tokens=6, stop=())
    with jax.default_matmul_precision("highest"):
        result = evaluate(model, tokenizer, bad.select([exact.name]), seq_len=12, batch_size=4,
                          max_new_tokens=6, stop=())
    assert list(exact.examples["prompt"]) == [f"question {w}? answer " for w in inputs]
    expect = np.mean([exact_match(p, [t]) for p, t in zip(preds, targets, strict=True)])
    assert result.per_task[exact.name]["value"] == pytest.approx(expect)
    assert result.per_task[exact.name]["metric"] == "exact_match"


def test_evaluate_refuses_an_empty_pool():
    with pytest.raises(ValueError, match=r"tasks: the pool has no tasks to evaluate; pass a "
                                         r"TaskPool with at least one task"):
        evaluate(None, None, TaskPool([]))


def test_generation_rows_are_checked_and_one_string_is_one_reference(tokenizer, rng):
    """`references` given as one string was scored as its characters (the model's own output
    as the reference scored 0); a row without references or prompt failed with a KeyError or a
    TypeError from inside tokenization. Rows follow make_task's rules now."""
    model = _tiny_lm(len(tokenizer), rng)
    prompts = [f"question {w}? answer " for w in rng.choice(WORDS, size=4, replace=False)]
    with jax.default_matmul_precision("highest"):
        preds = [_greedy_without_cache(model, tokenizer, p, 6) for p in prompts]
    refs = [p if k < 2 else "zebra" for k, p in enumerate(preds)]
    rows = [{"prompt": p, "target": "x", "references": r}  # one string each
            for p, r in zip(prompts, refs, strict=True)]
    rows[3] = {"prompt": prompts[3], "target": refs[3]}  # no references: the target
    with jax.default_matmul_precision("highest"):
        out = score_generation(model, tokenizer, rows, prompt_len=12, max_new_tokens=6,
                               batch_size=4, stop=())
    expect = np.mean([" ".join(p.lower().split()) == " ".join(r.lower().split())
                      for p, r in zip(preds, refs, strict=True)])
    assert out["predictions"] == preds and out["value"] == pytest.approx(expect)
    k = int(rng.integers(4))
    for bad, match in [({"prompt": None, "references": ["a"]}, r"\['prompt'\]: expected a string"),
                       ({"prompt": "a"}, r": no 'references' and no 'target' string"),
                       ({"prompt": "a", "references": ["a", 3]},
                        r"\['references'\]: expected a string or a list of strings")]:
        with pytest.raises(ValueError, match=rf"examples\[{k}\]" + match):
            score_generation(model, tokenizer, rows[:k] + [bad] + rows[k + 1:], prompt_len=12,
                             max_new_tokens=6, batch_size=4)


def test_multiple_choice_grade_is_bigbench_s_on_several_correct_choices(tokenizer, rng):
    """BIG-bench's multiple_choice_grade credits the target_scores value of the chosen choice
    (several choices may score 1, or fractions); only the first highest-scored choice was
    credited before. Reference: BIG-bench's formula over NumPy float64 bigram log-likelihoods."""
    from taskpgm_jax.data.sources.bigbench import convert_task

    v = len(tokenizer)
    table = rng.normal(size=(v, v)) * 2
    examples = []
    for _ in range(8):
        choices = [str(c) for c in rng.choice(WORDS, size=int(rng.integers(3, 6)), replace=False)]
        scores = rng.choice([0.0, 0.25, 0.5, 1.0], size=len(choices))
        pick = rng.choice(len(choices), size=3, replace=False)
        scores[pick[:2]], scores[pick[2]] = 1.0, 0.0  # two correct choices, one wrong
        examples.append({"input": f"question {rng.choice(WORDS)}?",
                         "target_scores": dict(zip(choices, scores.tolist(), strict=True))})
    task = convert_task({"examples": examples, "preferred_score": "multiple_choice_grade",
                         "example_input_prefix": "", "example_output_prefix": " answer ",
                         "append_choices_to_input": False}, "t", "bigbench:1.0.0/t")
    rows = list(task.examples)
    out = score_multiple_choice(Bigram(table), tokenizer, rows, seq_len=16, batch_size=4)
    grade = grade_norm = 0.0
    for ex, row in zip(examples, rows, strict=True):
        ref = np.array([_reference_loglik(table, tokenizer, row["prompt"], c)
                        for c in ex["target_scores"]])
        grade += list(ex["target_scores"].values())[int(np.argmax(ref[:, 0]))]
        grade_norm += list(ex["target_scores"].values())[int(np.argmax(ref[:, 0] / ref[:, 1]))]
    assert out["value"] == pytest.approx(grade / len(rows))
    assert out["accuracy_length_normalised"] == pytest.approx(grade_norm / len(rows))
    # One correct choice, scored 1 (every single-answer task): the grade is the accuracy.
    plain = _random_choice_examples(rng, 5)
    one_hot = [{**ex, "choice_scores": [float(j == ex["answer"]) for j in range(len(ex["choices"]))]}
               for ex in plain]
    a = score_multiple_choice(Bigram(table), tokenizer, plain, seq_len=16, batch_size=4)
    b = score_multiple_choice(Bigram(table), tokenizer, one_hot, seq_len=16, batch_size=4)
    assert a == b
