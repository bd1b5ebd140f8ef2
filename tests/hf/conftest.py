"""Session-wide tiny checkpoints: each is built and saved once, then shared by the tests."""

import pytest

from tests.hf import tiny


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """case -> (directory written by save_pretrained, the PyTorch model), built lazily."""
    cache = {}

    def get(case: str):
        if case not in cache:
            model = tiny.build(case)
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path)
            cache[case] = (path, model)
        return cache[case]

    return get
