"""A truncated MobileNetV2 .h5 (a download or copy killed midway) is never used, and a download goes to a
temporary name, is checked, then renamed. The download is served by a local HTTP server (no network here)
with the real weights file, whole or cut short."""

from __future__ import annotations

import http.server
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import testkit

from worker.config import Settings
from worker.engine import weights
from worker.engine.weights import resolve_weights, weights_file_name, weights_file_problem
from worker.errors import WeightsNotFound

pytestmark = pytest.mark.realdata

NAME_96, NAME_224 = weights_file_name(1.0, 96), weights_file_name(1.0, 224)


@pytest.fixture(scope="module")
def good_file() -> Path:
    return testkit.require_weights() / NAME_96


def truncated_copy(good: Path, target: Path, fraction: float = 0.5) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    target.write_bytes(data[:int(len(data) * fraction)])
    return target


def keras_cache(home: Path) -> Path:
    return home / ".keras" / "models"


def test_the_check_refuses_truncated_and_foreign_files(good_file: Path, tmp_path: Path) -> None:
    assert weights_file_problem(good_file) is None
    for fraction in (0.01, 0.5, 0.999):
        problem = weights_file_problem(truncated_copy(good_file, tmp_path / f"{fraction}.h5", fraction))
        assert problem is not None and "truncated" in problem, problem
    (tmp_path / "page.h5").write_text("<html>proxy error</html>")
    assert weights_file_problem(tmp_path / "page.h5") == "not an HDF5 file"


def test_a_truncated_file_in_the_keras_cache_is_skipped_for_a_good_one(
        good_file: Path, tmp_path: Path, isolated_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An older version's interrupted download left the job's own size truncated; another size is used."""
    truncated = truncated_copy(good_file, keras_cache(isolated_home) / NAME_96)
    shutil.copy(good_file.parent / NAME_224, keras_cache(isolated_home) / NAME_224)
    with caplog.at_level(logging.WARNING, logger="worker.engine.weights"):
        found = resolve_weights(Settings(weights_dir=tmp_path / "empty", allow_download=False), 1.0, 96)
    assert found.path == str(keras_cache(isolated_home) / NAME_224) and found.size == 224
    assert any(str(truncated) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_a_truncated_file_in_the_weights_dir_gives_way_to_the_keras_cache(
        good_file: Path, tmp_path: Path, isolated_home: Path) -> None:
    truncated_copy(good_file, tmp_path / "weights" / NAME_96)
    keras_cache(isolated_home).mkdir(parents=True)
    shutil.copy(good_file, keras_cache(isolated_home) / NAME_96)
    found = resolve_weights(Settings(weights_dir=tmp_path / "weights", allow_download=False), 1.0, 96)
    assert found.source == "keras_cache" and found.size == 96


def test_only_a_truncated_file_is_a_clear_error(good_file: Path, tmp_path: Path, isolated_home: Path) -> None:
    truncated = truncated_copy(good_file, keras_cache(isolated_home) / NAME_96)
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights(Settings(weights_dir=tmp_path / "empty", allow_download=False), 1.0, 96)
    assert f"{truncated} (unusable: truncated" in str(info.value)


# ----- the download -----

class Server:
    """Serves `content` at any path; `cut_at` closes the connection after that many bytes (a killed download
    seen from the client: the Content-Length announced, fewer bytes received)."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.cut_at: int | None = None
        self.requests = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(owner.content)))
                self.end_headers()
                self.wfile.write(owner.content[:owner.cut_at])
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(good_file: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    served = Server(good_file.read_bytes())
    monkeypatch.setattr(weights, "BASE_URL", served.url)
    yield served
    served.close()


def test_a_download_cut_short_leaves_nothing_under_the_real_name(
        server: Server, tmp_path: Path, isolated_home: Path) -> None:
    settings = Settings(weights_dir=tmp_path / "empty", allow_download=True)
    server.cut_at = len(server.content) // 3
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights(settings, 1.0, 96)
    assert "download of" in str(info.value) and "failed" in str(info.value)
    cache = keras_cache(isolated_home)
    assert not (cache / NAME_96).exists(), "a partial download must never take the real name"
    assert list(cache.iterdir()) == [], "nor be left under a temporary one"

    server.cut_at = None  # the network is back: the next job downloads it whole
    found = resolve_weights(settings, 1.0, 96)
    assert found.source == "download" and found.path == str(cache / NAME_96)
    assert (cache / NAME_96).read_bytes() == server.content and sorted(p.name for p in cache.iterdir()) == [NAME_96]


def test_a_truncated_file_left_by_an_older_version_is_downloaded_again(
        server: Server, good_file: Path, tmp_path: Path, isolated_home: Path) -> None:
    """Keras' own get_file wrote straight to the real name: a kill left it truncated, and every later job
    used it. Now it is refused, and a whole copy replaces it."""
    truncated_copy(good_file, keras_cache(isolated_home) / NAME_96)
    found = resolve_weights(Settings(weights_dir=tmp_path / "empty", allow_download=True), 1.0, 96)
    assert found.source == "download" and server.requests == 1
    assert weights_file_problem(Path(found.path)) is None
    assert Path(found.path).read_bytes() == good_file.read_bytes()


def test_a_download_that_is_not_hdf5_is_refused(server: Server, tmp_path: Path, isolated_home: Path) -> None:
    server.content = b"<html>captive portal</html>" * 40_000  # a whole, announced body, but not the weights
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights(Settings(weights_dir=tmp_path / "empty", allow_download=True), 1.0, 96)
    assert "not an HDF5 file" in str(info.value)
    assert list(keras_cache(isolated_home).iterdir()) == []
