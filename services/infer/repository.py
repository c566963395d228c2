"""The Triton model repository this infer replica manages: one Triton model per (model, version).

A version becomes `<repo>/<model>-v<version>/1/{model.py, hf/...}` plus a generated config.pbtxt.
Separate Triton models per version (rather than Triton versions of one model) let each version load,
warm and unload on its own without touching the others.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from llmesh.common.events import InvalidEvent, ReleaseEvent, file_sha256

MODEL_PY = Path(__file__).parent / "triton_model" / "model.py"
REQUIRED = ("config.json", "tokenizer.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

CONFIG_TEMPLATE = """name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "INPUT_IDS" data_type: TYPE_INT32 dims: [ -1 ] }},
  {{ name: "MAX_TOKENS" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "TEMPERATURE" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "TOP_P" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "SEED" data_type: TYPE_UINT64 dims: [ 1 ] optional: true }},
  {{ name: "STOP" data_type: TYPE_STRING dims: [ -1 ] optional: true }},
  {{ name: "STREAM" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "BACKGROUND" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}
]
output [
  {{ name: "TOKEN_IDS" data_type: TYPE_INT32 dims: [ -1 ] }},
  {{ name: "FINISH_REASON" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ count: {instances} kind: {kind} }} ]
"""
PARAMETER_TEMPLATE = 'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'


def triton_name(model: str, version: int) -> str:
    return f"{model}-v{version}"


def verify_artifacts(event: ReleaseEvent, roots: Sequence[Path] = ()) -> dict[str, Path]:
    """Check the artifact directory against the event; return the files to stage, by name. With
    `roots`, the directory (symlinks followed) must lie inside one of them: the model store."""
    source = event.artifact_dir()
    if roots and not any(source.resolve().is_relative_to(root.resolve()) for root in roots):
        raise InvalidEvent(f"artifact directory {source} is outside the model store ({', '.join(map(str, roots))})")
    if not source.is_dir():
        raise InvalidEvent(f"artifact directory {source} does not exist")
    files: dict[str, Path] = {}
    for path in sorted(source.iterdir()):
        if path.is_symlink():
            raise InvalidEvent(f"artifact {path.name} is a symlink; copy the file itself")
        if path.is_file():
            files[path.name] = path
    if pickled := [n for n in files if n.endswith(PICKLE_SUFFIXES)]:
        raise InvalidEvent(f"pickled weights are refused ({', '.join(pickled)}); ship safetensors")
    if not any(n.endswith(".safetensors") for n in files):
        raise InvalidEvent("no .safetensors weights in the artifact directory")
    if missing := [n for n in REQUIRED if n not in files]:
        raise InvalidEvent(f"artifact directory lacks {', '.join(missing)}")
    if unlisted := sorted(set(files) - set(event.sha256)):
        raise InvalidEvent(f"no sha256 given for {', '.join(unlisted)}")
    if absent := sorted(set(event.sha256) - set(files)):
        raise InvalidEvent(f"artifact files listed but missing: {', '.join(absent)}")
    for name, path in files.items():
        if file_sha256(path) != event.sha256[name]:
            raise InvalidEvent(f"sha256 mismatch for {name}: the artifact is corrupt or was changed")
    return files


class ModelRepository:
    def __init__(self, root: Path, *, kind: str, instances: int, parameters: dict[str, str]) -> None:
        """`parameters` reach model.py through config.pbtxt (torch_threads, background_niceness)."""
        self.root = root
        self.kind = kind
        self.instances = instances
        self.parameters = parameters
        root.mkdir(parents=True, exist_ok=True)

    def stage(self, event: ReleaseEvent, files: dict[str, Path]) -> str:
        """Copy verified artifacts into the repository; returns the Triton model name."""
        name = triton_name(event.model, event.version)
        target = self.root / name
        staging = self.root / f".{name}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        hf = staging / "1" / "hf"
        hf.mkdir(parents=True)
        for file_name, path in files.items():
            shutil.copyfile(path, hf / file_name)
        shutil.copyfile(MODEL_PY, staging / "1" / "model.py")
        config = CONFIG_TEMPLATE.format(name=name, instances=self.instances, kind=self.kind) + "".join(
            PARAMETER_TEMPLATE.format(key=key, value=value) for key, value in self.parameters.items()
        )
        (staging / "config.pbtxt").write_text(config)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        return name

    @staticmethod
    def name_of(model: str, version: int) -> str:
        return triton_name(model, version)

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)
