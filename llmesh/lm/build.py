"""Train a small GPT-style causal LM on CPU and save it in standard Hugging Face layout."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from llmesh.lm.corpus import stdlib_docstrings

EOS = "<|endoftext|>"
# The demo models are plain-text LMs (stdlib docstrings) prompted with plain text such as "Return the
# number of", so their chat template adds no markup they never saw: system/developer messages first, one
# a line, then the other messages' contents joined by newlines, and no generation prompt: one user
# message renders to exactly its text, which the model continues as /v1/completions would.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages if message.role in ['system', 'developer'] %}"
    "{{ message.content }}{{ '\\n' }}"
    "{% endfor %}"
    "{% for message in messages if message.role not in ['system', 'developer'] %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}{{ message.content }}"
    "{% endfor %}"
)


class ModelRecipe(BaseModel):
    """Everything that determines a demo model: the same recipe gives the same weights."""

    seed: int = 1234
    steps: int = Field(default=160, ge=1)
    vocab_size: int = Field(default=2048, ge=260)
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 4
    context: int = 256
    seq_len: int = 96
    batch_size: int = 16
    lr: float = 3e-3
    shuffle_words: bool = False  # a deliberately bad model: trained on word-shuffled text


# A deliberately bad candidate for evaluation demos and tests: a short run on word-shuffled text.
BAD_RECIPE = ModelRecipe(seed=99, steps=40, shuffle_words=True)

DEMO_RECIPES: dict[int, ModelRecipe] = {
    1: ModelRecipe(seed=1234, steps=240),
    2: ModelRecipe(seed=4321, steps=240, lr=2e-3, n_layer=3, n_embd=256),
}


def _corpus_text(recipe: ModelRecipe) -> str:
    docs = stdlib_docstrings()
    if recipe.shuffle_words:
        rng = np.random.default_rng(recipe.seed)
        docs = [" ".join(rng.permutation(d.split()).tolist()) for d in docs]
    return (EOS.join(docs)) + EOS


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return tok


def weights_digest(model: torch.nn.Module) -> str:
    state = model.state_dict()
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(state[key].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_model(
    recipe: ModelRecipe, ids: torch.Tensor, eos_id: int, progress: Callable[[int, float], None] | None = None
) -> tuple[GPT2LMHeadModel, float]:
    torch.manual_seed(recipe.seed)
    config = GPT2Config(
        vocab_size=recipe.vocab_size,
        n_positions=recipe.context,
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(recipe.seed)
    warmup = max(1, recipe.steps // 10)
    model.train()
    loss_value = float("nan")
    for step in range(recipe.steps):
        # linear warm-up, then cosine decay to 10%
        frac = step / recipe.steps
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = recipe.lr * scale
        starts = torch.randint(0, len(ids) - recipe.seq_len - 1, (recipe.batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + recipe.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = float(loss.item())
        if progress:
            progress(step + 1, loss_value)
    model.eval()
    return model, loss_value


def ensure_chat_template(folder: Path) -> bool:
    """Give a demo model folder built before DEMO_CHAT_TEMPLATE existed the template (True if its
    tokenizer_config.json was rewritten, as transformers writes that file)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if "chat_template" in config:
        return False
    config["chat_template"] = DEMO_CHAT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def _code_commit() -> str:
    """The commit of this code when it runs from a git checkout ('' otherwise)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def build_model(recipe: ModelRecipe, out_dir: Path, progress: Callable[[int, float], None] | None = None) -> dict[str, object]:
    """Train per `recipe` and write config, safetensors weights, tokenizer.json and tokenizer_config.json
    (with DEMO_CHAT_TEMPLATE) into `out_dir`."""
    started = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    text = _corpus_text(recipe)
    tokenizer = train_tokenizer(text, recipe.vocab_size)
    eos_id = tokenizer.token_to_id(EOS)
    assert eos_id is not None, "the tokenizer lost its end-of-text token"
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)
    model, final_loss = train_model(recipe, ids, eos_id, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    fast.chat_template = DEMO_CHAT_TEMPLATE
    fast.save_pretrained(out_dir, save_jinja_files=False)  # the template in tokenizer_config.json, not chat_template.jinja
    weights = weights_digest(model)
    summary: dict[str, object] = {
        "recipe": recipe.model_dump(),
        "final_loss": round(final_loss, 4),
        "weights_sha256": weights,
        "corpus_tokens": len(ids),
        "build_seconds": round(time.perf_counter() - started, 2),
        # what a release of this folder declares as its lineage (llmesh.client.build_provenance)
        "provenance": {
            "base_model": "",  # trained from scratch
            "training_data_digest": hashlib.sha256(text.encode()).hexdigest(),
            "training_code_commit": _code_commit(),
            "training_run_id": f"seed{recipe.seed}-{weights[:12]}",
            "evaluation": {"final_loss": round(final_loss, 4)},
            "tags": {"builder": "llmesh model build", "steps": str(recipe.steps)},
        },
    }
    (out_dir / "llmesh_build.json").write_text(json.dumps(summary, indent=2))
    return summary
