"""The web page's files, without a browser: `GET /` and its static files are served (with a same-origin policy,
and without the key the API wants), they name nothing outside this origin, and the package carries them.
The page's behaviour in a real browser is tests/integration/test_ui.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import testkit
from fastapi.testclient import TestClient

from service.main import create_app
from service.routes.ui import STATIC_FILES, UI_DIR
from worker.config import Settings

#: The one absolute URL the files may hold: the SVG namespace, a name that is never fetched.
SVG_NAMESPACE = "http://www.w3.org/2000/svg"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", artifact_dir=tmp_path_factory.mktemp("artifacts"),
                        api_key="a-key", allowed_hosts="testserver")
    with TestClient(create_app(settings)) as client:
        yield client


def test_the_page_is_served_without_the_key_with_a_same_origin_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                      "img-src 'self' blob: data:"):
        assert directive in policy
    assert client.get("/v1/models").status_code == 401  # the API behind it still wants the key


def test_every_file_the_page_names_is_served_with_its_type(client: TestClient) -> None:
    names = re.findall(r'(?:src|href)="(/[^"]*)"', client.get("/").text)
    assert sorted(names) == ["/ui/app.js", "/ui/style.css"]
    for name in names:
        response = client.get(name)
        assert response.status_code == 200, name
        assert response.headers["content-type"] == STATIC_FILES[name.rsplit("/", 1)[1]]
        assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/ui/index.html", "/ui/nothing.js", "/ui/..%2Froutes%2Fui.py", "/ui/"])
def test_nothing_else_is_served_from_the_page_folder(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


@pytest.mark.parametrize("name", sorted(p.name for p in UI_DIR.iterdir()))
def test_the_files_name_nothing_outside_this_origin(name: str) -> None:
    text = (UI_DIR / name).read_text()
    urls = set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"'`)]*", text, re.IGNORECASE))
    assert urls <= {SVG_NAMESPACE, "//www.w3.org/2000/svg"}, urls
    assert "@import" not in text and "url(" not in text.replace("URL.createObjectURL(", "")


def test_the_package_carries_every_file_of_the_page() -> None:
    config = tomllib.loads((testkit.REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    for path in UI_DIR.iterdir():
        relative = str(Path("ui") / path.name)
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
    assert {"index.html", *STATIC_FILES} == {p.name for p in UI_DIR.iterdir()}
