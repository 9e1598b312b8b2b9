"""Fixtures of the integration tests: one real stack per session, and the models trained on it once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import testkit

from .harness import BASELINE_SMALL, Stack, shared_stack, train

#: The transfer model the prediction and model tests share: small, but clearly better than chance.
TRANSFER_SMALL: dict[str, Any] = {"model": "transfer", "train_samples": 600, "test_samples": 200, "epochs": 3,
                                  "batch_size": 32, "image_size": 96, "seed": 7, "name": "it-transfer"}


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest, redis_server: testkit.RedisServer) -> Stack:
    return shared_stack(request, redis_server)


@pytest.fixture
def client(stack: Stack, request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    with stack.client() as client:
        yield client
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(stack.log_tails())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def realdata() -> None:
    testkit.require_data()


@pytest.fixture(scope="session")
def weights(realdata: None) -> None:
    testkit.require_weights()


@pytest.fixture(scope="session")
def baseline_job(stack: Stack, realdata: None) -> dict[str, Any]:
    """A succeeded small baseline job (trained once per session)."""
    with stack.client() as client:
        return train(client, {**BASELINE_SMALL, "name": "it-baseline"})


@pytest.fixture(scope="session")
def transfer_job(stack: Stack, weights: None) -> dict[str, Any]:
    """A succeeded small transfer job (trained once per session)."""
    with stack.client() as client:
        return train(client, TRANSFER_SMALL)
