"""Train/test split, duplicate accounting and the per-class minimums.

Samples arrive in a canonical order (files sorted by path, npz arrays by index), so the result depends on the
content and `seed` only, not on the order of the archive's entries.
- Given split (train/ + test/ folders, a split column, x_test): kept as it is.
- Otherwise, per class (classes in sorted order), `test_fraction` of its distinct images go to test (rounded,
  at least `min_test_per_class`, leaving at least `min_train_per_class`), drawn with numpy's
  `default_rng(seed)`. Identical copies inside a class move together, so no copy lands on both sides.
- A test image identical to a training image is removed from test (`duplicates.train_test`): it would inflate
  test accuracy. Duplicates within one split are kept and counted (`duplicates.within_split`): each copy after
  the first.
- Each split is finally put in an order drawn with the same generator (not grouped by class), so a consumer
  that takes the first N, or the last fraction for validation, sees every class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from worker.datasets.collect import Sample
from worker.datasets.errors import DatasetError
from worker.datasets.limits import Limits


@dataclass(frozen=True)
class SplitResult:
    #: Indices into the samples, in their stored order.
    train: list[int]
    test: list[int]
    within_split: int
    train_test: int


def split_samples(samples: Sequence[Sample], classes: Sequence[str], *, given: bool, test_fraction: float,
                  seed: int, limits: Limits, skipped_per_class: Mapping[str, int]) -> SplitResult:
    """Split `samples` (canonical order) into train and test; refuses a class left below the minimums."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {name: [] for name in classes}
    for i, sample in enumerate(samples):
        by_class[sample.label].append(i)
    if given:
        train = [i for i, s in enumerate(samples) if s.split == "train"]
        test = [i for i, s in enumerate(samples) if s.split == "test"]
    else:
        train, test = [], []
        for name in classes:
            class_train, class_test = _draw(samples, by_class[name], name, test_fraction, rng, limits,
                                            skipped_per_class.get(name, 0))
            train += class_train
            test += class_test
        train.sort()
        test.sort()
    train_digests = {samples[i].digest for i in train}
    kept_test = [i for i in test if samples[i].digest not in train_digests]
    train_test = len(test) - len(kept_test)
    _check_minimums(samples, classes, train, kept_test, test, limits, skipped_per_class)
    within = _repeats(samples, train) + _repeats(samples, kept_test)
    return SplitResult([train[i] for i in rng.permutation(len(train))],
                       [kept_test[i] for i in rng.permutation(len(kept_test))], within, train_test)


def _draw(samples: Sequence[Sample], members: list[int], name: str, test_fraction: float,
          rng: np.random.Generator, limits: Limits, skipped: int) -> tuple[list[int], list[int]]:
    groups: dict[bytes, list[int]] = {}
    for i in members:
        groups.setdefault(samples[i].digest, []).append(i)
    distinct = list(groups.values())
    needed = limits.min_train_per_class + limits.min_test_per_class
    if len(distinct) < needed:
        copies = f" ({len(members)} with exact copies)" if len(members) != len(distinct) else ""
        raise DatasetError(f"class {name!r} has {len(distinct)} usable distinct image(s){copies}"
                           f"{_skip_note(skipped)}; "
                           f"every class needs at least {needed} ({limits.min_train_per_class} for training, "
                           f"{limits.min_test_per_class} for testing): add images to it or remove it")
    n_test = math.floor(test_fraction * len(distinct) + 0.5)
    n_test = min(max(n_test, limits.min_test_per_class), len(distinct) - limits.min_train_per_class)
    order = rng.permutation(len(distinct))
    test = [i for g in order[:n_test] for i in distinct[g]]
    train = [i for g in order[n_test:] for i in distinct[g]]
    return train, test


def _skip_note(skipped: int) -> str:
    return f"; {skipped} of its files were skipped (see skipped)" if skipped else ""


def _check_minimums(samples: Sequence[Sample], classes: Sequence[str], train: list[int], kept_test: list[int],
                    test: list[int], limits: Limits, skipped_per_class: Mapping[str, int]) -> None:
    train_counts = counts(samples, classes, train)
    test_counts = counts(samples, classes, kept_test)
    removed = {name: n - test_counts[name] for name, n in counts(samples, classes, test).items()}
    for name in classes:
        if train_counts[name] < limits.min_train_per_class:
            note = _skip_note(skipped_per_class.get(name, 0))
            raise DatasetError(f"class {name!r} has {train_counts[name]} training image(s){note}; "
                               f"every class needs at least {limits.min_train_per_class}: add training images of it "
                               "or remove it")
        if test_counts[name] < limits.min_test_per_class:
            also = f" once {removed[name]} also in training are removed" if removed[name] else ""
            raise DatasetError(f"class {name!r} has {test_counts[name]} test image(s){also}"
                               f"{_skip_note(skipped_per_class.get(name, 0))}; every class needs at least "
                               f"{limits.min_test_per_class}: add test images of it or remove it")


def counts(samples: Sequence[Sample], classes: Sequence[str], indices: list[int]) -> dict[str, int]:
    """Images per class among `indices`, every class present (0 where none)."""
    per_class = dict.fromkeys(classes, 0)
    for i in indices:
        per_class[samples[i].label] += 1
    return per_class


def _repeats(samples: Sequence[Sample], indices: list[int]) -> int:
    return len(indices) - len({samples[i].digest for i in indices})
