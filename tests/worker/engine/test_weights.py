"""Where the MobileNetV2 weights come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import Settings
from worker.engine.weights import resolve_weights, size_preference, weights_file_name
from worker.errors import WeightsNotFound


def test_official_file_names_and_size_order() -> None:
    assert weights_file_name(1.0, 96) == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    assert weights_file_name(0.35, 224) == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    assert size_preference(96) == [96, 128, 160, 192, 224]
    assert size_preference(224) == [224, 192, 160, 128, 96]
    assert size_preference(100)[:2] == [96, 128]  # not a Keras size: nearest first


def test_missing_weights_name_every_path_and_the_file_to_add(tmp_path: Path, isolated_home: Path) -> None:
    settings = Settings(weights_dir=tmp_path / "weights", allow_download=False)
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights(settings, 0.5, 128)
    message = str(info.value)
    wanted = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_128_no_top.h5"
    assert f"put {wanted}" in message and str(tmp_path / "weights") in message
    for size in (96, 128, 160, 192, 224):
        name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_{size}_no_top.h5"
        assert str(tmp_path / "weights" / name) in message
        assert str(isolated_home / ".keras" / "models" / name) in message
    assert "TL_ALLOW_DOWNLOAD is false" in message


@pytest.mark.realdata
def test_another_size_of_the_same_alpha_is_used_and_said(shared_settings: Settings, tmp_path: Path,
                                                         isolated_home: Path) -> None:
    assert shared_settings.weights_dir is not None
    only_224 = tmp_path / "weights"
    only_224.mkdir()
    name = weights_file_name(1.0, 224)
    (only_224 / name).symlink_to(shared_settings.weights_dir / name)
    found = resolve_weights(shared_settings.model_copy(update={"weights_dir": only_224}), 1.0, 96)
    assert found.size == 224 and found.image_size == 96 and found.source == "weights_dir"
    assert "used the 224px file for a 96px job" in found.reason
    assert len(found.sha256) == 64


@pytest.mark.realdata
def test_the_jobs_own_size_comes_first(shared_settings: Settings) -> None:
    found = resolve_weights(shared_settings, 1.0, 96)
    assert found.size == 96 and found.file_name == weights_file_name(1.0, 96)
