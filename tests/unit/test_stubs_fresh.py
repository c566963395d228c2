"""CI fails when the committed protobuf stubs do not match proto/."""

import filecmp
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_the_protos(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "llmesh" / "v1").iterdir() if p.is_file())
    committed = sorted(p.relative_to(REPO) for p in (REPO / "llmesh" / "v1").iterdir() if p.is_file())
    assert fresh == committed, "stubs added or removed: run `python scripts/gen_protos.py`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, REPO / p, shallow=False)]
    assert not stale, f"stale stubs {stale}: run `python scripts/gen_protos.py`"
