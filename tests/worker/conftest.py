"""Fixtures for the training engine's tests: settings pointing at the shared real data and weights.

The real files are found by `testkit` (TL_DATA_DIR / TL_WEIGHTS_DIR when they hold them, else `../shared` next
to the repository, as in CI). Each test gets its own artifact directory. Tests that need the real files are
marked `realdata` and skip cleanly when the files are absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import testkit

from worker.config import Settings
from worker.jobstore import EpochRecord


def pytest_configure(config: pytest.Config) -> None:
    # Keras 3.15 converts its variables with np.array(x) on NumPy 2 and NumPy warns once per weight read;
    # it is Keras' own code path, not ours.
    config.addinivalue_line("filterwarnings",
                            "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@pytest.fixture(scope="session")
def shared_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data, weights = testkit.require_data(), testkit.require_weights()
    # An artifact directory of the session's own, so the decoded-data cache never lands in the checkout.
    # No exports beyond model.keras and model.tflite: they cost a transfer job tens of seconds, and the tests of
    # the exports ask for them (test_training's transfer_run, test_exports).
    return Settings().model_copy(update={"data_dir": data, "weights_dir": weights, "allow_download": False,
                                         "artifact_dir": tmp_path_factory.mktemp("shared-artifacts"),
                                         "exports": ""})


@pytest.fixture
def settings(shared_settings: Settings, tmp_path: Path) -> Settings:
    """Real data and weights, a fresh artifact directory, no downloads."""
    return shared_settings.model_copy(update={"artifact_dir": tmp_path / "artifacts"})


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty HOME, so Keras' own caches (~/.keras/datasets, ~/.keras/models) hold nothing."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    yield home


class RecordingReporter:
    """A reporter that records everything and asks to cancel after `cancel_after` cancel checks."""

    def __init__(self, cancel_after: int | None = None, cancel_in_stage: str | None = None) -> None:
        self.stages: list[str] = []
        self.fractions: list[float] = []
        self.epochs: list[EpochRecord] = []
        self.checks = 0
        self.checks_in_stage: dict[str, int] = {}
        self.cancel_after = cancel_after
        self.cancel_in_stage = cancel_in_stage

    def stage(self, stage: str) -> None:
        self.stages.append(stage)

    def progress(self, fraction: float) -> None:
        self.fractions.append(fraction)

    def epoch_end(self, record: EpochRecord) -> None:
        self.epochs.append(record)

    def cancel_requested(self) -> bool:
        self.checks += 1
        stage = self.stages[-1] if self.stages else ""
        self.checks_in_stage[stage] = self.checks_in_stage.get(stage, 0) + 1
        if self.cancel_after is None:
            return False
        if self.cancel_in_stage is not None:
            return stage == self.cancel_in_stage and self.checks_in_stage[stage] > self.cancel_after
        return self.checks > self.cancel_after


@pytest.fixture(scope="session")
def recording_reporter() -> type[RecordingReporter]:
    """The RecordingReporter class (tests/ is not a package, so tests get it through this fixture)."""
    return RecordingReporter
