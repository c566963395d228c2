"""Offline, on CPU, in this one process: three ways of generating the same greedy tokens with the demo
model, for the same prompts, at batch sizes 1, 4, 16 and 16, 128 new tokens (no stack, no Triton):

- `llmesh`: the Triton model's own continuous batching (`Batch` of services/infer/triton_model/model.py:
  a left-padded DynamicCache, an attention mask and position ids), driven as its `Scheduler` drives
  prompts arriving together within its prefill budget: prefilled in one left-padded pass, then one
  forward pass per step for every row; a row leaves (`keep`) once it has its tokens.
- `transformers-cb`: transformers' continuous batching (`ContinuousBatchingManager`, a paged KV
  cache; `generate_batch` is the same manager made and destroyed per call), made and started before
  the clock starts, requests added and their results awaited on the clock.
- `transformers-generate`: plain `model.generate` on a left-padded static batch (attention mask).

Every engine decodes greedily (argmax) with no stop token, so every prompt gets exactly N tokens;
each engine's tokens are compared with those of the same prompt generated alone (prefill, then one
token at a time with its own cache). The three engines interleave in each cell (one untimed warm-up
run each, then `repeats` timed runs each, in turn), so machine noise hits them alike. An engine that
fails records its error in its rows instead of stopping the benchmark.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import pyplot, save

MODEL_PY = Path(__file__).resolve().parents[1] / "services" / "infer" / "triton_model" / "model.py"
PB_UTILS = "triton_python_backend_utils"  # Triton's backend utilities, which model.py imports
ENGINES = ("llmesh", "transformers-cb", "transformers-generate")
ROW_KEYS = (
    "engine",
    "batch",
    "max_tokens",
    "seconds",
    "tokens_per_s",
    "runs_s",
    "setup_s",
    "warmup_s",
    "greedy_equal",
    "tokens_equal",
    "runs_identical",
    "error",
)
SEED = 18
# Words of the demo models' corpus (stdlib docstrings): prompts are seeded draws of them.
_WORDS = (
    "Return the number of items in the list object value string file path name module class function "
    "if is not None and or a an to of for with from this that when raise ValueError TypeError default "
    "argument arguments keyword optional should be can must returns new copy dictionary set tuple "
    "iterator sequence bytes encoding buffer socket thread lock timeout process signal error message"
)
WORDS = _WORDS.split()
CB_PAGE_SIZE = 32  # tokens per page of transformers' paged cache (its default, 256, is for GPUs)

Engine = Callable[[], list[list[int]]]  # one run: every prompt's generated tokens, in order


@dataclass(eq=False)  # Batch.keep finds rows by identity
class Row:
    """What `Batch` needs of a sequence: its prompt, its tokens so far, its length and prefill."""

    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    length: int = 0
    prefilled: int = 0


def load_model_module(stand_in: types.ModuleType | None = None, name: str = "llmesh_bench_triton_model") -> types.ModuleType:
    """services/infer/triton_model/model.py, imported as `name` outside Triton: `stand_in` (default a
    bare module, as `Batch` never calls it) sits in sys.modules as `triton_python_backend_utils` for
    the import only, then whatever was there is put back."""
    missing = types.ModuleType("missing")
    before = sys.modules.get(PB_UTILS, missing)
    sys.modules[PB_UTILS] = stand_in or types.ModuleType(PB_UTILS)
    try:
        spec = importlib.util.spec_from_file_location(name, MODEL_PY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if before is missing:
            sys.modules.pop(PB_UTILS, None)
        else:
            sys.modules[PB_UTILS] = before
    return module


def make_prompts(encode: Callable[[str], list[int]], count: int, seed: int = SEED) -> list[list[int]]:
    """`count` prompts of 10 to 40 tokens, seeded draws of WORDS (the same for the same seed)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        length = rng.randint(10, 40)
        ids: list[int] = []
        while len(ids) < length:
            ids = encode(" ".join(rng.choice(WORDS) for _ in range(length)))
        prompts.append(ids[:length])
    return prompts


@torch.inference_mode()
def alone(model: Any, prompt: list[int], n: int) -> list[int]:
    """The reference: `prompt` by itself, prefilled, then `n` greedy tokens one at a time."""
    out = model(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < n:
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


@torch.inference_mode()
def llmesh_generate(model: Any, batch_class: Any, prompts: Sequence[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens through the Triton model's `Batch`, as `Scheduler` runs prompts that arrive
    together within its prefill budget: prefilled in one left-padded pass, then stepped together."""
    rows = [Row(list(prompt)) for prompt in prompts]
    batch, logits = batch_class.prefilled(model, rows, torch.device("cpu"))
    while True:
        for i, row in enumerate(batch.seqs):
            row.generated.append(int(logits[i].argmax()))
        batch.keep([row for row in batch.seqs if len(row.generated) < n])
        if not len(batch):
            return [row.generated for row in rows]
        logits = batch.step(model)


@torch.inference_mode()
def generate_static(model: Any, prompts: Sequence[list[int]], n: int) -> list[list[int]]:
    """Greedy tokens of `model.generate` on one left-padded batch. The stop token is an id beyond the
    vocabulary: no row stops early and no logit is masked (as min_new_tokens would mask the eos)."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(
        max_new_tokens=n, do_sample=False, eos_token_id=model.config.vocab_size, pad_token_id=0, use_cache=True
    )
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, width:].tolist()


@contextlib.contextmanager
def cb_engine(model: Any, prompts: Sequence[list[int]], n: int, facts: dict[str, Any]) -> Iterator[Engine]:
    """transformers' ContinuousBatchingManager, sized for this cell (page size CB_PAGE_SIZE, just enough
    pages, every prompt's prefill in one step), started; each run adds the prompts and waits for all."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    longest = max(len(p) for p in prompts)
    pages = -(-(longest + n) // CB_PAGE_SIZE)
    knobs = {
        "page_size": CB_PAGE_SIZE,
        "num_blocks": len(prompts) * (pages + 1),
        "max_batch_tokens": max(256, sum(len(p) for p in prompts)),
        "allow_block_sharing": False,  # no shared prefixes here
    }
    # eos -1: no stop token (the manager's own convention); do_sample False: argmax
    generation = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(
        generation_config=generation,
        continuous_batching_config=ContinuousBatchingConfig(**knobs),
        workload_hints=WorkloadHints(max_prompt_length=longest, max_generated_length=n, num_requests=len(prompts)),
    )
    facts.setdefault("knobs", {})[f"batch {len(prompts)}, {n} tokens"] = knobs
    facts.update(
        attn_implementation=model.config._attn_implementation,
        use_cuda_graph=list(manager.continuous_batching_config.cuda_graph_booleans),
        use_async_batching=manager.continuous_batching_config.use_async_batching,
    )
    try:
        manager.warmup()
        manager.start()

        def run() -> list[list[int]]:
            ids = manager.add_requests(inputs=[list(p) for p in prompts], max_new_tokens=n)
            done: dict[str, Any] = {}
            deadline = time.monotonic() + 120
            while len(done) < len(ids):
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running() or time.monotonic() > deadline:
                        fatal = manager.background_thread_status.fatal_error
                        raise RuntimeError(f"continuous batching stopped with {len(done)}/{len(ids)} results: {fatal!r}")
                    continue
                if result.is_finished():
                    if result.error is not None:
                        raise RuntimeError(f"request {result.request_id} failed: {result.error}")
                    done[result.request_id] = result
            return [list(done[i].generated_tokens) for i in ids]

        yield run
    finally:
        with contextlib.suppress(Exception):  # an error of the cell's is already recorded
            manager.stop(block=True, timeout=30)
            manager.destroy()


@contextlib.contextmanager
def _plain(run: Engine) -> Iterator[Engine]:
    yield run


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:500]


def measure(
    model: Any,
    prompts: Sequence[list[int]],
    sizes: Sequence[int],
    tokens: Sequence[int],
    repeats: int,
    say: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """One row per engine, batch size and number of new tokens (the first `size` prompts, `n` greedy tokens)."""
    model.eval()
    batch_class = load_model_module().Batch
    started = time.perf_counter()
    reference = [alone(model, p, max(tokens)) for p in prompts[: max(sizes)]]
    say(f"alone: {len(reference)} prompts, {max(tokens)} tokens each, in {time.perf_counter() - started:.1f}s")
    cb_facts: dict[str, Any] = {}
    rows = []
    for n in tokens:
        for size in sizes:
            batch, want = list(prompts[:size]), [r[:n] for r in reference[:size]]
            rows += _cell(_makers(model, batch_class, batch, n, cb_facts), want, size, n, repeats)
            say(f"batch {size}, {n} tokens: " + ", ".join(f"{r['engine']} {r['tokens_per_s']} tokens/s" for r in rows[-3:]))
    errors = {e: next((r["error"] for r in rows if r["engine"] == e and r["error"]), None) for e in ENGINES}
    return {"rows": rows, "errors": errors, "transformers_cb": cb_facts}


def _makers(
    model: Any, batch_class: Any, prompts: list[list[int]], n: int, cb_facts: dict[str, Any]
) -> dict[str, Callable[[], contextlib.AbstractContextManager[Engine]]]:
    """Each engine, to open for one cell (`prompts`, `n` tokens)."""

    def llmesh() -> contextlib.AbstractContextManager[Engine]:
        return _plain(lambda: llmesh_generate(model, batch_class, prompts, n))

    def cb() -> contextlib.AbstractContextManager[Engine]:
        return cb_engine(model, prompts, n, cb_facts)

    def generate() -> contextlib.AbstractContextManager[Engine]:
        return _plain(lambda: generate_static(model, prompts, n))

    return {"llmesh": llmesh, "transformers-cb": cb, "transformers-generate": generate}


def _cell(
    makers: dict[str, Callable[[], contextlib.AbstractContextManager[Engine]]],
    want: list[list[int]],
    size: int,
    n: int,
    repeats: int,
) -> list[dict[str, Any]]:
    rows = {engine: dict.fromkeys(ROW_KEYS) | {"engine": engine, "batch": size, "max_tokens": n} for engine in makers}
    runs: dict[str, list[float]] = {engine: [] for engine in makers}
    first: dict[str, list[list[int]]] = {}
    with contextlib.ExitStack() as stack:
        engines: dict[str, Engine] = {}
        for engine, make in makers.items():
            row = rows[engine]
            try:
                started = time.perf_counter()
                engines[engine] = stack.enter_context(make())
                row["setup_s"] = round(time.perf_counter() - started, 3)
                started = time.perf_counter()
                first[engine] = engines[engine]()  # the warm-up, whose tokens are compared
                row["warmup_s"] = round(time.perf_counter() - started, 3)
                row |= _equality(first[engine], want, n) | {"runs_identical": True}
            except Exception as err:
                row["error"] = _error(err)
                engines.pop(engine, None)
        for _ in range(repeats):
            for engine, run in list(engines.items()):
                try:
                    started = time.perf_counter()
                    got = run()
                    runs[engine].append(time.perf_counter() - started)
                except Exception as err:
                    rows[engine]["error"] = _error(err)
                    engines.pop(engine)
                    continue
                if got != first[engine]:  # the same batch gave other tokens than in its warm-up
                    rows[engine]["runs_identical"] = False
    for engine, row in rows.items():
        if runs[engine] and row["error"] is None:
            seconds = statistics.median(runs[engine])
            row |= {
                "seconds": round(seconds, 4),
                "tokens_per_s": round(size * n / seconds, 1),
                "runs_s": [round(s, 4) for s in runs[engine]],
            }
    return list(rows.values())


def _equality(got: list[list[int]], want: list[list[int]], n: int) -> dict[str, float]:
    """Fractions of the prompts whose tokens all equal those generated alone, and of the tokens."""
    if len(got) != len(want) or any(len(g) != n for g in got):
        raise RuntimeError(f"expected {len(want)} rows of {n} tokens, got lengths {[len(g) for g in got]}")
    same = sum(g == w for g, w in zip(got, want, strict=True))
    tokens = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    return {"greedy_equal": round(same / len(want), 4), "tokens_equal": round(tokens / (len(want) * n), 4)}


def run(out: Path, quick: bool, models_dir: Path, say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Measure the demo model `chat` v1 of `models_dir`; write engines.png under `out`."""
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    sizes, tokens, repeats = ([1, 4], [16], 1) if quick else ([1, 4, 16], [16, 128], 3)
    folder = models_dir / "chat-v1"
    model = AutoModelForCausalLM.from_pretrained(folder).to("cpu").eval()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompts = make_prompts(lambda text: tokenizer.encode(text).ids, max(sizes))
    result: dict[str, Any] = {
        "device": "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": folder.name,
        "attn_implementation": model.config._attn_implementation,
        "prompt_tokens": [len(p) for p in prompts],
        "repeats": repeats,
    }
    result |= measure(model, prompts, sizes, tokens, repeats, say)
    plot(result["rows"], out / "engines.png")
    return result


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    sizes = sorted({r["max_tokens"] for r in rows})
    fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 8), squeeze=False)
    for column, size in enumerate(sizes):
        for engine, style in zip(ENGINES, ("-", "--", ":"), strict=True):
            mine = [r for r in rows if r["max_tokens"] == size and r["engine"] == engine and r["error"] is None]
            xs = [r["batch"] for r in mine]
            axes[0][column].plot(xs, [r["tokens_per_s"] for r in mine], style, marker="o", label=engine)
            axes[1][column].plot(xs, [r["greedy_equal"] for r in mine], style, marker="o", label=engine)
        axes[0][column].set_title(f"{size} new tokens: tokens/s (CPU, one process)")
        axes[1][column].set_title(f"{size} new tokens: share of prompts equal to alone")
        axes[1][column].set_ylim(-0.05, 1.05)
        for ax in (axes[0][column], axes[1][column]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.legend()
    save(fig, path, dpi=110)
