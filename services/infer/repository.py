"""The Triton model repository this infer replica manages: one Triton model per (model, version).

A version becomes `<repo>/<model>-v<version>/1/{model.py, hf/...}` plus a generated config.pbtxt.
Separate Triton models per version (rather than Triton versions of one model) let each version load,
warm and unload on its own without touching the others.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from llmesh.common.events import InvalidEvent, ReleaseEvent, file_sha256

MODEL_PY = Path(__file__).parent / "triton_model" / "model.py"
REQUIRED = ("config.json", "tokenizer.json")
DIGEST_FILE = "content-digest"  # beside config.pbtxt: which stored version a Triton model folder holds
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


def parse_triton_name(name: str) -> tuple[str, int] | None:
    """(model, version) of a Triton model name that `triton_name` made; None for any other name."""
    model, _, version = name.rpartition("-v")
    return (model, int(version)) if model and version.isdigit() else None


def verify_release(event: ReleaseEvent, roots: Sequence[Path] = ()) -> dict[str, Path]:
    """Check the artifact directory a release event names against its sha256 (see verify_artifacts)."""
    return verify_artifacts(event.artifact_dir(), event.sha256, roots)


def verify_artifacts(source: Path, sha256: dict[str, str], roots: Sequence[Path] = ()) -> dict[str, Path]:
    """Check an artifact directory against the sha256 of every file; return the files to stage, by
    name. With `roots`, the directory (symlinks followed) must lie inside one of them."""
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
    if pickled := [n for n in files if n.lower().endswith(PICKLE_SUFFIXES)]:
        raise InvalidEvent(f"pickled weights are refused ({', '.join(pickled)}); ship safetensors")
    if not any(n.lower().endswith(".safetensors") for n in files):
        raise InvalidEvent("no .safetensors weights in the artifact directory")
    if missing := [n for n in REQUIRED if n not in files]:
        raise InvalidEvent(f"artifact directory lacks {', '.join(missing)}")
    if unlisted := sorted(set(files) - set(sha256)):
        raise InvalidEvent(f"no sha256 given for {', '.join(unlisted)}")
    if absent := sorted(set(sha256) - set(files)):
        raise InvalidEvent(f"artifact files listed but missing: {', '.join(absent)}")
    for name, path in files.items():
        if file_sha256(path) != sha256[name]:
            raise InvalidEvent(f"sha256 mismatch for {name}: the artifact is corrupt or was changed")
    return files


class ModelRepository:
    def __init__(self, root: Path, *, kind: str, instances: int, parameters: dict[str, str]) -> None:
        """`parameters` reach model.py through config.pbtxt (torch_threads, background_niceness, max_batch,
        prefill_tokens)."""
        self.root = root
        self.kind = kind
        self.instances = instances
        self.parameters = parameters
        root.mkdir(parents=True, exist_ok=True)

    def stage(self, model: str, version: int, files: dict[str, Path], digest: str) -> str:
        """Copy verified artifacts into the repository; returns the Triton model name."""
        name = triton_name(model, version)
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
        (staging / DIGEST_FILE).write_text(digest)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        return name

    def staged_digest(self, name: str) -> str:
        """The content digest of what is staged as Triton model `name` ('' if nothing is)."""
        try:
            return (self.root / name / DIGEST_FILE).read_text()
        except OSError:
            return ""

    @staticmethod
    def name_of(model: str, version: int) -> str:
        return triton_name(model, version)

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)


class ModelStore:
    """Verified artifacts, one read-only folder per content digest (`<root>/<digest>/<file>`): what
    every replica loads from after staging, so the operator's folder is read exactly once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise InvalidEvent(f"{digest[:80]!r} is not a content digest")
        return self.root / digest

    def put(self, digest: str, files: dict[str, Path]) -> dict[str, Path]:
        """Copy verified `files` in (once: a digest's folder never changes); returns the stored files."""
        target = self.path(digest)
        if not target.is_dir():
            staging = self.root / f".{digest}.{os.getpid()}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            for name, path in files.items():
                shutil.copyfile(path, staging / name)
                (staging / name).chmod(0o444)
            try:
                staging.rename(target)  # atomic: a folder named by its digest is complete
            except OSError:  # another replica stored the same content meanwhile
                shutil.rmtree(staging, ignore_errors=True)
        return {name: target / name for name in files}

    def files(self, digest: str, sha256: dict[str, str]) -> dict[str, Path]:
        """The stored files of `digest`, checked against `sha256` (what Redis says is not trusted)."""
        return verify_artifacts(self.path(digest), sha256)
