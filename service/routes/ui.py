"""The web page for people: `GET /` and its few static files (service/ui/), which use the /v1 API same-origin.

The files ship inside the package (pyproject.toml's package-data), are served as they are (no build step), and
load nothing from elsewhere. They are open like /docs: the page itself asks for the key when /v1 answers 401.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import NotFound

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
#: Every file the page is made of, with its media type: nothing else under service/ui/ is served.
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: The page changes with the package: revalidate (cheap, the ETag answers 304) rather than cache it stale.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
#: The browser itself holds the page to its promise: scripts, styles and requests from this origin only (images
#: also as blob: URLs, which is how the page shows PNGs fetched with the key, and the pictures being classified).
PAGE_HEADERS = {
    **HEADERS,
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def read_page() -> FileResponse:
    """The web page: jobs, models, datasets and classify."""
    return FileResponse(UI_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/ui/{name}")
async def read_page_file(name: str) -> FileResponse:
    """One of the page's static files (its script and style sheet)."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise NotFound(f"no such file of the web page: {name!r}")
    return FileResponse(UI_DIR / name, media_type=media_type, headers=HEADERS)
