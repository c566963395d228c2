"""The model versions this infer replica has loaded in Triton, and the requests running on each."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class LoadedVersion:
    model: str
    version: int
    triton_model: str
    digest: str = ""  # the stored version it was loaded from
    in_flight: int = 0


class ServedVersions:
    def __init__(self) -> None:
        self._loaded: dict[tuple[str, int], LoadedVersion] = {}

    def get(self, model: str, version: int) -> LoadedVersion | None:
        return self._loaded.get((model, version))

    def add(self, model: str, version: int, triton_model: str, digest: str) -> None:
        self._loaded.setdefault((model, version), LoadedVersion(model, version, triton_model, digest))

    def replace(self, model: str, version: int, triton_model: str, digest: str) -> None:
        """Loaded again (maybe other content under the same number): requests running keep their entry."""
        self._loaded[(model, version)] = LoadedVersion(model, version, triton_model, digest)

    def remove(self, model: str, version: int) -> None:
        self._loaded.pop((model, version), None)

    def of_model(self, model: str) -> list[LoadedVersion]:
        return [v for (m, _), v in sorted(self._loaded.items()) if m == model]

    def all(self) -> list[LoadedVersion]:
        return [v for _, v in sorted(self._loaded.items())]

    @contextmanager
    def running(self, loaded: LoadedVersion) -> Iterator[None]:
        """Count a request on `loaded` while it runs (a version drains before it is unloaded)."""
        loaded.in_flight += 1
        try:
            yield
        finally:
            loaded.in_flight -= 1
