from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

TINY_VOCAB = 64


@pytest.fixture(scope="module")
def tiny_gpt2() -> Iterator[Any]:
    """A tiny random GPT-2 (64 tokens, eos 63), on one torch thread while the module's tests run."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # initializer_range 1 (not 0.02): a GPT-2 that small and that quiet only repeats its last token;
    # this one's greedy runs wander over the vocabulary, so that a wrong row, position or mask shows.
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=TINY_VOCAB,
        n_positions=128,
        eos_token_id=63,
        bos_token_id=63,
        initializer_range=1.0,
    )
    yield transformers.GPT2LMHeadModel(config).eval()
    torch.set_num_threads(threads)
