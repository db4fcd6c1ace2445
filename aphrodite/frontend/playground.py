"""The browser playground: GET / serves its page and GET /static/{name} its CSS and
JavaScript, from aphrodite/frontend/static/ inside the package (no CDN, no build step)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")
PAGE = "index.html"
CONTENT_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}


class PlaygroundFiles:
    """The folder's files, read once: a request can only name one of them, never a path."""

    def __init__(self, folder: Path = STATIC_DIR):
        self.files = {path.name: (path.read_bytes(), CONTENT_TYPES[path.suffix])
                      for path in sorted(folder.iterdir()) if path.suffix in CONTENT_TYPES}

    def _serve(self, name: str) -> web.Response:
        if name not in self.files:
            raise web.HTTPNotFound()
        body, content_type = self.files[name]
        # no-cache: the browser revalidates, so an upgraded server's files are picked up
        return web.Response(body=body, content_type=content_type, charset="utf-8",
                            headers={"Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff"})

    async def playground(self, request: web.Request) -> web.Response:
        """The playground page: chat and completion, every sampler, token probabilities."""
        return self._serve(PAGE)

    async def static_file(self, request: web.Request) -> web.Response:
        """One of the playground page's files (CSS, JavaScript)."""
        return self._serve(request.match_info["name"])
