"""Config files that YAML reads without complaint but that cannot mean what was written: a key
given twice (YAML keeps the later, dropping a whole section) is refused, naming the key and
both lines."""

import pytest

from taskpgm_jax.cli import main
from taskpgm_jax.config import ConfigError, load_config


def test_a_section_given_twice_is_refused_naming_both_lines(tmp_path, rng, capsys):
    steps, lr, batch = int(rng.integers(101, 999)), float(rng.uniform(1e-4, 1e-2)), 4
    path = tmp_path / "dup.yaml"
    path.write_text(f"name: dup\nfinetune:\n  steps: {steps}\n  learning_rate: {lr}\n"
                    f"data:\n  source: synthetic\nfinetune:\n  batch_size: {batch}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "key 'finetune' appears twice (lines 2 and 7)" in msg
    # The same one line from the command, before any planning.
    assert main(["run", str(path), "--dry-run", "--devices", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'finetune' appears twice" in err
    # One section: accepted, every value kept.
    path.write_text(f"name: dup\nfinetune:\n  steps: {steps}\n  learning_rate: {lr}\n"
                    f"  batch_size: {batch}\n")
    cfg = load_config(path)
    assert (cfg.finetune.steps, cfg.finetune.learning_rate, cfg.finetune.batch_size) == \
        (steps, lr, batch)


def test_nested_and_override_duplicates_are_refused_by_dotted_key(tmp_path, rng):
    seeds = [int(s) for s in rng.integers(0, 1000, size=2)]
    path = tmp_path / "nested.yaml"
    path.write_text(f"name: n\ndata:\n  synthetic:\n    seed: {seeds[0]}\n    n_noise: 1\n"
                    f"    seed: {seeds[1]}\n")
    with pytest.raises(ConfigError, match=r"key 'data\.synthetic\.seed' appears twice "
                                          r"\(lines 4 and 6\)"):
        load_config(path)
    # Inside a list of mappings (hub datasets) too.
    path.write_text("name: n\ndata:\n  hub:\n    train:\n      - path: a\n        path: b\n")
    with pytest.raises(ConfigError, match=r"'data\.hub\.train\[0\]\.path' appears twice"):
        load_config(path)
    path.write_text("name: n\n")
    with pytest.raises(ConfigError, match=r"override 'model\.size=.*'hidden_size' appears twice"):
        load_config(path, ["model.size={hidden_size: 64, hidden_size: 32}"])


def test_merge_keys_are_not_duplicates_but_two_merged_sections_are(tmp_path, rng):
    """`<<: *anchor` then a key of the anchor is YAML's way to override: allowed."""
    a, b = (int(v) for v in rng.integers(10, 500, size=2))
    path = tmp_path / "merge.yaml"
    path.write_text(f"name: m\nsingle_task: &ft\n  steps: {a}\nfinetune:\n  <<: *ft\n"
                    f"finetune:\n  steps: {b}\n")
    with pytest.raises(ConfigError, match=r"'finetune' appears twice \(lines 4 and 6\)"):
        load_config(path)
    path.write_text(f"name: m\nsingle_task: &ft\n  steps: {a}\n  batch_size: 4\n"
                    f"finetune:\n  <<: *ft\n  steps: {b}\n")
    cfg = load_config(path)
    assert (cfg.single_task.steps, cfg.finetune.steps, cfg.finetune.batch_size) == (a, b, 4)
