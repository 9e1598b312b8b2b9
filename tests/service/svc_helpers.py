"""Helpers shared by the service tests (a module name of its own: `conftest` is ambiguous across test folders)."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import testkit
from PIL import Image

from worker.config import Settings
from worker.store import METADATA_FILE, TFLITE_FILE


def make_settings(redis_url: str, artifact_dir: Path, **overrides: Any) -> Settings:
    """Settings for one test; every value the tests rely on is given, so TL_* variables cannot leak in."""
    values: dict[str, Any] = {
        "redis_url": redis_url, "artifact_dir": artifact_dir, "artifact_url": None,
        "cache_dir": artifact_dir.parent / "cache",
        "data_dir": testkit.data_dir() or testkit.SHARED / "data",
        "weights_dir": testkit.weights_dir() or testkit.SHARED / "weights",
        "api_key": None, "max_upload_bytes": 10 * 1024 * 1024, "max_batch": 64,
        "model_cache_size": 4, "batch_window_ms": 2.0, "serving_threads": 2, "job_lost_seconds": 45.0,
        "allow_download": False, "allowed_hosts": "localhost,127.0.0.1,::1,testserver",  # TestClient's Host
    }
    values.update(overrides)
    return Settings(**values)


def assert_problem(response: Any, status: int, detail_contains: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem+json with `status`; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["type"] == "about:blank"
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    if detail_contains is not None:
        assert detail_contains in body["detail"], body["detail"]
    return body


def image_bytes(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def add_model(artifact_dir: Path, source: Path, model_id: str, *, created_at: str | None = None,
              name: str | None = None, tflite: bool = True) -> Path:
    """Put a copy of a trained model directory into an artifact store under another id (and date)."""
    target = artifact_dir / "models" / model_id
    shutil.copytree(source, target)
    meta = json.loads((target / METADATA_FILE).read_text())
    meta.update({"id": model_id, **({"created_at": created_at} if created_at else {}),
                 **({"name": name} if name else {})})
    (target / METADATA_FILE).write_text(json.dumps(meta))
    if not tflite:
        (target / TFLITE_FILE).unlink()
    return target


def cifar_test_images(count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` real CIFAR-10 test images (uint8 Nx32x32x3) and their labels."""
    with np.load(testkit.cifar10_npz("test")) as data:
        return data["x"][start:start + count], data["y"][start:start + count].astype(int).ravel()


def png(pixels: np.ndarray) -> bytes:
    return image_bytes(Image.fromarray(np.asarray(pixels, dtype=np.uint8)))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor lie about its size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
