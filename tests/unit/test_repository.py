from pathlib import Path

import pytest

from llmesh.common.events import InvalidEvent, ReleaseEvent, artifact_digests
from services.infer.repository import ModelRepository, verify_release


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"n_positions": 64}')
    (d / "tokenizer.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\x00" * 32)
    return d


def _event(d: Path, **kw) -> ReleaseEvent:
    return ReleaseEvent(
        model="chat", version=1, artifact_uri=d.as_uri(), sha256=kw.pop("sha256") if "sha256" in kw else artifact_digests(d), **kw
    )


def test_good_artifacts_stage_into_a_triton_model(artifacts: Path, tmp_path: Path):
    event = _event(artifacts)
    repo = ModelRepository(tmp_path / "repo", kind="KIND_CPU", instances=1, parameters={"torch_threads": "2"})
    name = repo.stage("chat", 1, verify_release(event), event.content_digest())
    assert name == "chat-v1"
    assert (tmp_path / "repo/chat-v1/1/hf/model.safetensors").exists()
    assert (tmp_path / "repo/chat-v1/1/model.py").exists()
    config = (tmp_path / "repo/chat-v1/config.pbtxt").read_text()
    assert 'name: "chat-v1"' in config and "decoupled: true" in config and "KIND_CPU" in config
    assert 'key: "torch_threads" value: { string_value: "2" }' in config


def test_corrupt_file_is_refused(artifacts: Path):
    event = _event(artifacts)
    (artifacts / "model.safetensors").write_bytes(b"\x01" * 32)
    with pytest.raises(InvalidEvent, match=r"sha256 mismatch for model\.safetensors"):
        verify_release(event)


def test_pickled_weights_are_refused(artifacts: Path):
    (artifacts / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidEvent, match="pickled weights are refused"):
        verify_release(_event(artifacts))


def test_missing_directory_is_refused(tmp_path: Path):
    with pytest.raises(InvalidEvent, match="does not exist"):
        verify_release(_event(tmp_path / "nowhere", sha256={}))


def test_symlinks_are_refused(artifacts: Path, tmp_path: Path):
    (tmp_path / "secret").write_text("x")
    (artifacts / "extra.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(InvalidEvent, match="symlink"):
        verify_release(_event(artifacts, sha256={}))


def test_unlisted_files_are_refused(artifacts: Path):
    digests = artifact_digests(artifacts)
    del digests["tokenizer.json"]
    with pytest.raises(InvalidEvent, match=r"no sha256 given for tokenizer.json"):
        verify_release(_event(artifacts, sha256=digests))


def test_pickle_suffixes_are_refused_whatever_their_case(artifacts: Path):
    (artifacts / "extra.BIN").write_bytes(b"pickle")
    with pytest.raises(InvalidEvent, match=r"pickled weights are refused \(extra.BIN\)"):
        verify_release(_event(artifacts))


def test_the_model_store_keeps_one_read_only_copy_per_digest(artifacts: Path, tmp_path: Path):
    from services.infer.repository import ModelStore

    event = _event(artifacts)
    store = ModelStore(tmp_path / "store")
    stored = store.put(event.content_digest(), verify_release(event))
    assert stored["model.safetensors"].parent == tmp_path / "store" / event.content_digest()
    assert stored["model.safetensors"].stat().st_mode & 0o222 == 0
    assert set(store.files(event.content_digest(), event.sha256)) == set(event.sha256)
    with pytest.raises(InvalidEvent, match="not a content digest"):
        store.path("../etc")
