"""What every test folder shares: where the repository and the real data are, and which Redis database is whose.

`import testkit` works from every test folder (tests/conftest.py puts tests/ on sys.path); the integration
harness also reaches it as `tests.testkit` when bench/ imports `tests.integration.harness`.

Real data: `TL_DATA_DIR` / `TL_WEIGHTS_DIR` when they hold the files (as CI sets them), else `../shared/data`
and `../shared/weights` beside the repository. `data_dir()` / `weights_dir()` answer a path or None;
`require_data()` / `require_weights()` skip the calling test with a message that says what to set.

Redis: one server per session (the `redis_server` fixture in tests/conftest.py); each suite keeps a database
index of its own (below), so no suite ever flushes another's data.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

# With tests/ on sys.path and the project installed in editable mode (a meta-path finder, not a path entry),
# tests/service and tests/worker would be imported as namespace packages `service` and `worker`; the
# repository on sys.path makes the real packages win (as `python -m pytest` does).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# ----- Redis database indexes (the default configuration uses 0) -----

FUZZ_DB = 10  # tests/integration/test_fuzz.py
SERVICE_DB = 12  # tests/service
INTEGRATION_DB = 13  # tests/integration's shared stack, tests/test_examples.py
RUNNER_DB = 14  # tests/worker/test_runner.py


@dataclass(frozen=True)
class RedisServer:
    """The session's Redis server; `url(db)` is the URL of one database index on it."""

    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> RedisServer:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 6379)

    def url(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"


# ----- the real CIFAR-10 data and MobileNetV2 weights -----

#: The alpha-1.0 MobileNetV2 ImageNet weights without the top, any input size.
MOBILENET_WEIGHTS = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_*_no_top.h5"

NO_DATA = ("needs real CIFAR-10: set TL_DATA_DIR to a directory with cifar10/train.npz and cifar10/test.npz "
           f"(CI: ../shared/data; also looked in {SHARED / 'data'})")
NO_WEIGHTS = ("needs the MobileNetV2 ImageNet weights: set TL_WEIGHTS_DIR to a directory with "
              f"{MOBILENET_WEIGHTS.replace('*', '96')} (CI: ../shared/weights; also looked in {SHARED / 'weights'})")


def _candidates(variable: str, name: str) -> list[Path]:
    value = os.environ.get(variable)
    return [*([Path(value).expanduser()] if value else []), SHARED / name]


def holds_cifar10(root: Path) -> bool:
    """`root` holds CIFAR-10 in a form the engine reads (the npz pair, the official archive or its folder)."""
    if (root / "cifar10" / "train.npz").is_file() and (root / "cifar10" / "test.npz").is_file():
        return True
    return any((place / "cifar-10-python.tar.gz").is_file() or (place / "cifar-10-batches-py").is_dir()
               for place in (root, root / "cifar10"))


def holds_weights(root: Path) -> bool:
    return root.is_dir() and any(root.glob(MOBILENET_WEIGHTS))


def data_dir() -> Path | None:
    """The directory to give as `TL_DATA_DIR`: `TL_DATA_DIR` when it holds CIFAR-10, else ../shared/data, else None."""
    return next((root for root in _candidates("TL_DATA_DIR", "data") if holds_cifar10(root)), None)


def weights_dir() -> Path | None:
    """`TL_WEIGHTS_DIR` when it holds the MobileNetV2 weights, else ../shared/weights when it does, else None."""
    return next((root for root in _candidates("TL_WEIGHTS_DIR", "weights") if holds_weights(root)), None)


def require_data() -> Path:
    """`data_dir()`, or skip the test."""
    found = data_dir()
    if found is None:
        pytest.skip(NO_DATA)
    return found


def require_weights() -> Path:
    """`weights_dir()`, or skip the test."""
    found = weights_dir()
    if found is None:
        pytest.skip(NO_WEIGHTS)
    return found


def cifar10_npz(split: str) -> Path:
    """The real `cifar10/<split>.npz` (for tests that read images themselves), or skip the test."""
    root = data_dir()
    path = root / "cifar10" / f"{split}.npz" if root is not None else None
    if path is None or not path.is_file():
        pytest.skip(NO_DATA)
    return path
