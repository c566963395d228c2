"""`llmesh bench engines`' core on a tiny random GPT-2: the Triton model's `Batch`, transformers'
continuous batching and `generate` each run a batch of 2 prompts for 4 greedy tokens; the Triton
model's must give every prompt the tokens it gets alone, and an engine that fails is recorded."""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from bench import engines  # noqa: E402

PROMPTS = [[5, 17, 3, 40, 22, 9, 31, 12, 8, 50, 2], [7, 7, 33, 1, 60, 14, 27, 45, 19, 4, 38, 11, 26, 55, 30, 6]]


@pytest.fixture(scope="module")
def tiny(tiny_gpt2):
    return tiny_gpt2


def test_llmesh_batch_gives_the_tokens_of_each_prompt_alone(tiny):
    before = sys.modules.get("triton_python_backend_utils")  # test_foreground may have put one there
    batch_class = engines.load_model_module().Batch
    assert sys.modules.get("triton_python_backend_utils") is before  # the stand-in was there for the import only
    alone = [engines.alone(tiny, prompt, 4) for prompt in PROMPTS]
    assert engines.llmesh_generate(tiny, batch_class, PROMPTS, 4) == alone
    assert engines.llmesh_generate(tiny, batch_class, PROMPTS, 1) == [tokens[:1] for tokens in alone]


def test_measure_rows(tiny):
    result = engines.measure(tiny, PROMPTS, sizes=[2], tokens=[4], repeats=1)
    rows = {row["engine"]: row for row in result["rows"]}
    assert list(rows) == list(engines.ENGINES)
    assert all(list(row) == list(engines.ROW_KEYS) for row in rows.values())
    assert all(row["batch"] == 2 and row["max_tokens"] == 4 for row in rows.values())
    llmesh = rows["llmesh"]
    assert llmesh["error"] is None and llmesh["greedy_equal"] == 1.0 and llmesh["tokens_equal"] == 1.0
    assert llmesh["tokens_per_s"] > 0 and llmesh["runs_identical"] is True
    assert rows["transformers-generate"]["error"] is None and rows["transformers-generate"]["tokens_per_s"] > 0
    cb = rows["transformers-cb"]
    if cb["error"] is None:  # it runs on CPU (transformers 5.23, sdpa over its paged cache)
        assert cb["tokens_per_s"] > 0 and 0 <= cb["greedy_equal"] <= 1
        assert result["transformers_cb"]["attn_implementation"]
    else:
        assert isinstance(cb["error"], str) and cb["tokens_per_s"] is None
    assert result["errors"]["llmesh"] is None and result["errors"]["transformers-cb"] == cb["error"]


def test_a_failing_engine_is_recorded_not_raised(tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no continuous batching here")

    monkeypatch.setattr(tiny, "init_continuous_batching", broken)
    result = engines.measure(tiny, PROMPTS, sizes=[1], tokens=[2], repeats=1)
    rows = {row["engine"]: row for row in result["rows"]}
    assert rows["transformers-cb"]["error"] == "RuntimeError: no continuous batching here"
    assert rows["transformers-cb"]["tokens_per_s"] is None and rows["transformers-cb"]["seconds"] is None
    assert result["errors"]["transformers-cb"] == "RuntimeError: no continuous batching here"
    assert rows["llmesh"]["error"] is None and rows["llmesh"]["greedy_equal"] == 1.0
