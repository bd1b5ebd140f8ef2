"""Task data: task pools from local files, the HF hub, BIG-bench and a planted synthetic suite;
tokenization with target-only loss masks; static-shape padding and packing; a resumable
multi-host iterator; and mixture weights -> examples."""

from taskpgm_jax.data.batch import (
    Batch, check_batch_values, pack_batches, pack_rows, pad_batch, rows_to_batch,
)
from taskpgm_jax.data.iterator import HostIterator, LazyEncoded, global_batch
from taskpgm_jax.data.materialize import load_materialized, materialize_mixture
from taskpgm_jax.data.sampling import (
    MixtureSample, baseline_weights, interleave_mixture, mixture_counts, sample_mixture,
)
from taskpgm_jax.data.sources import (
    BBH_MISSING, BBH_SOURCES, HubSpec, HubUnavailableError, fetch_bigbench, load_bigbench,
    load_hub_tasks, load_task_files, synthetic_suite,
)
from taskpgm_jax.data.tasks import (
    EXAMPLE_FEATURES, DataError, SplitSpec, Task, TaskPool, make_task, split_of,
)
from taskpgm_jax.data.tokenize import (
    Encoded, encode_choices, encode_example, encode_prompt, encode_task, load_tokenizer,
    train_byte_bpe,
)

__all__ = [
    "BBH_MISSING", "BBH_SOURCES", "Batch", "DataError", "EXAMPLE_FEATURES", "Encoded",
    "HostIterator", "HubSpec", "HubUnavailableError", "LazyEncoded", "MixtureSample",
    "SplitSpec", "Task", "TaskPool", "baseline_weights", "encode_choices", "encode_example",
    "check_batch_values", "encode_prompt", "encode_task", "fetch_bigbench", "global_batch",
    "interleave_mixture", "load_bigbench", "load_hub_tasks",
    "load_materialized", "load_task_files", "load_tokenizer", "make_task", "materialize_mixture",
    "mixture_counts", "pack_batches", "pack_rows", "pad_batch", "rows_to_batch", "sample_mixture",
    "split_of", "synthetic_suite", "train_byte_bpe",
]
