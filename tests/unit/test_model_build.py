"""The demo model builder is deterministic for a recipe and writes a standard Hugging Face folder."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from llmesh import client
from llmesh.lm.build import DEMO_CHAT_TEMPLATE, ModelRecipe, build_model, ensure_chat_template

TINY = ModelRecipe(steps=3, vocab_size=300, n_layer=1, n_embd=32, n_head=2, context=64, seq_len=32, batch_size=4)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny") / "m"
    return out, build_model(TINY, out)


def test_same_recipe_same_weights_other_seed_differs(built, tmp_path: Path):
    _, first = built
    again = build_model(TINY, tmp_path / "again")
    other = build_model(TINY.model_copy(update={"seed": 7}), tmp_path / "other")
    assert again["weights_sha256"] == first["weights_sha256"]
    assert other["weights_sha256"] != first["weights_sha256"]


def test_folder_loads_with_the_standard_auto_classes(built):
    out, summary = built
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.bin")), "weights must be safetensors only"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    assert model.config.n_positions == 64
    assert tokenizer.decode(tokenizer("Return the value.")["input_ids"]) == "Return the value."
    assert json.loads((out / "llmesh_build.json").read_text())["weights_sha256"] == summary["weights_sha256"]
    lineage = client.build_provenance(out)  # what a release of the folder declares
    assert lineage is not None and lineage.training_run_id.endswith(str(summary["weights_sha256"])[:12])
    assert len(lineage.training_data_digest) == 64 and lineage.evaluation == {"final_loss": summary["final_loss"]}
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == DEMO_CHAT_TEMPLATE
    assert not (out / "chat_template.jinja").exists()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Return the value."}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "Be brief.\nReturn the value."


def test_chat_template_added_to_an_older_folder(built, tmp_path: Path):
    out, _ = built
    config = json.loads((out / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    assert ensure_chat_template(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == config
    assert not ensure_chat_template(tmp_path)
