"""Pages to look through an index: the search page and its small HTTP server, and self-contained HTML reports.

Owns HTML and HTTP only; every answer comes from ``search.Searcher`` (and ``dedup``'s groups), so the page shows
exactly what ``mmcontrast search`` prints.

* ``contact_sheet`` / ``dedup_report``: one HTML file with the images inside it (base64 JPEG thumbnails), so it
  can be mailed or opened anywhere.
* ``make_server``: the standard library's threading HTTP server. ``GET /?q=TEXT`` (or ``?similar=ID``, what
  clicking an image asks) is the page with a search box and the results as ``<img>`` with their scores;
  ``GET /api/search?q=TEXT&k=K`` is ``search``'s JSON; ``GET /image/ID`` the thumbnail of indexed item ID. The
  server opens only files the index lists (by their number in it), never a path taken from a request, shows paths
  relative to the indexed folder (``public_path``), and answers a malformed query with 400 and one line saying what
  is wrong, never a traceback. ``is_loopback`` tells the command when to warn that the page is open to a network.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

from mmcontrast.errors import UsageError
from mmcontrast.search import Searcher

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
PAGE_K = 24  # results on the page unless ?k= says otherwise
MAX_K = 1000
REPORT_GROUPS = 200  # groups shown in a dedup report (the CSV has them all)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
form{margin-bottom:1em}input[type=text]{width:28em;padding:.4em;font-size:1em}button{padding:.4em 1em;font-size:1em}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:180px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;overflow:hidden}
figure img{width:180px;height:180px;object-fit:contain;background:#eee;display:block}
figcaption{font-size:12px;margin-top:4px;word-break:break-all}.score{font-weight:bold}
.error{color:#b00;font-weight:bold}.group{margin:1em 0;padding-top:.5em;border-top:1px solid #ccc}
.keep{border:2px solid #2a2}.missing{width:180px;height:180px;display:flex;align-items:center;justify-content:center;
background:#eee;color:#888}
"""


def _label(result: dict) -> str:
    return str(result.get("path") or result.get("key") or result.get("id"))


def _figure(img_src: str | None, result: dict, href: str | None = None, extra_class: str = "") -> str:
    name = _label(result)
    img = (f'<img src="{html.escape(img_src)}" alt="{html.escape(name)}" title="{html.escape(name)}">' if img_src
           else '<div class="missing">unreadable</div>')
    if href:
        img = f'<a href="{html.escape(href)}">{img}</a>'
    caption = f'<br>{html.escape(result["caption"])}' if result.get("caption") else ""
    return (f'<figure class="{extra_class}">{img}<figcaption><span class="score">{result["score"]:.4f}</span> '
            f'{html.escape(name.rsplit("/", 1)[-1])}{caption}</figcaption></figure>')


def _data_uri(searcher: Searcher, i: int) -> str | None:
    try:
        return "data:image/jpeg;base64," + base64.b64encode(searcher.thumbnail(i)).decode("ascii")
    except Exception:  # a file moved or damaged since indexing: shown as unreadable, the rest of the sheet stands
        return None


def _describe(query: dict) -> str:
    if "text" in query:
        return f"text “{query['text']}”"
    if "image" in query:
        return f"image {query['image']}"
    return f"images like {_label(query)}"


def _document(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{body}</body></html>\n")


def contact_sheet(searcher: Searcher, result: dict) -> str:
    """``search``'s result as one self-contained HTML page: the hits' thumbnails inline, with their scores."""
    figures = "".join(_figure(_data_uri(searcher, r["id"]), r) for r in result["results"])
    heading = f"<h2>{len(result['results'])} nearest to {html.escape(_describe(result['query']))}</h2>"
    return _document(f"search: {_describe(result['query'])}", f'{heading}<div class="grid">{figures}</div>')


def dedup_report(searcher: Searcher, groups: Sequence, threshold: float | None, limit: int = REPORT_GROUPS) -> str:
    """Near-duplicate groups as one self-contained HTML page (the first ``limit``): the one kept framed green."""
    at = f" at cosine ≥ {threshold}" if threshold is not None else " by perceptual hash"
    parts = [f"<h2>{len(groups)} groups of near-duplicates{at}</h2>"]
    for g, group in enumerate(groups[:limit]):
        figures = "".join(_figure(_data_uri(searcher, i), {**searcher.item(i), "score": s}, extra_class="keep" if n == 0 else "")
                          for n, (i, s) in enumerate(zip(group.ids, group.scores)))
        parts.append(f'<div class="group"><b>group {g}</b> ({len(group.ids)} images; the first is kept)'
                     f'<div class="grid">{figures}</div></div>')
    if len(groups) > limit:
        parts.append(f"<p>… and {len(groups) - limit} more groups in the CSV.</p>")
    return _document("near-duplicates", "".join(parts))


def search_page(result: dict | None, text: str = "", k: int = PAGE_K, error: str | None = None) -> str:
    """The server's page: a search box, then the results as ``<img>`` (served by ``/image/ID``) with their scores;
    clicking one searches for images like it."""
    form = (f'<form action="/" method="get"><input type="text" name="q" value="{html.escape(text)}" '
            f'placeholder="describe an image" autofocus> <input type="hidden" name="k" value="{k}">'
            f"<button type=submit>search</button></form>")
    body = form
    if error:
        body += f'<p class="error">{html.escape(error)}</p>'
    if result is not None:
        figures = "".join(_figure(f"/image/{r['id']}", r, href=f"/?similar={r['id']}&k={k}") for r in result["results"])
        body += (f"<h3>{len(result['results'])} nearest to {html.escape(_describe(result['query']))}</h3>"
                 f'<div class="grid" id="results">{figures}</div>')
    return _document("mmcontrast search" + (f": {text}" if text else ""), body)


def parse_query(query_string: str, default_k: int) -> tuple[str | None, str | None, int]:
    """``(text, similar_id, k)`` of a request's query string; a UsageError for anything malformed."""
    params = parse_qs(query_string, keep_blank_values=True)
    unknown = sorted(set(params) - {"q", "similar", "k"})
    if unknown:
        raise UsageError(f"unknown parameter {unknown[0]!r}; use q=TEXT or similar=ID, and k=K")
    if any(len(v) > 1 for v in params.values()):
        raise UsageError("give each parameter once")
    text, similar, k_text = (params.get(name, [None])[0] for name in ("q", "similar", "k"))
    if text is not None and similar is not None:
        raise UsageError("give q=TEXT or similar=ID, not both")
    try:
        k = default_k if k_text is None else int(k_text)
    except ValueError:
        raise UsageError(f"k must be a whole number, not {k_text!r}") from None
    if not 1 <= k <= MAX_K:
        raise UsageError(f"k must be between 1 and {MAX_K}, not {k}")
    if similar is not None and not similar.isdigit():
        raise UsageError(f"similar must be the number of an indexed image, not {similar!r}")
    return text, similar, k


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: whatever it resolves to, it is not promised to stay local
        return False


def public_path(searcher: Searcher, path: str) -> str:
    """``path`` as the page shows it: relative to the indexed folder, or the file name alone when it lies outside
    (a page served to a network never tells where on this machine the collection lives)."""
    from pathlib import PurePath

    root = (searcher.infos.get("source") or {}).get("images")
    if root and PurePath(path).is_relative_to(root):
        return str(PurePath(path).relative_to(root))
    return PurePath(path).name if PurePath(path).is_absolute() else path


def answer(searcher: Searcher, text: str | None, similar: str | None, k: int) -> dict:
    """The server's JSON for a query: ``search``'s result with paths relative to the indexed folder."""
    if similar is not None:
        result = searcher.search_similar(int(similar), k)
    elif text is None:
        raise UsageError("give q=TEXT (or similar=ID)")
    else:
        result = searcher.search_text(text, k)
    for row in [*result["results"], result["query"]]:
        for field in ("path", "shard"):
            if isinstance(row.get(field), str):
                row[field] = public_path(searcher, row[field])
    return result


class _Handler(BaseHTTPRequestHandler):
    searcher: Searcher  # set on the subclass make_server builds
    server_version = "mmcontrast"

    def log_message(self, format: str, *args) -> None:  # one line per request on stderr, as http.server does
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _page(self, status: int, page: str) -> None:
        self._send(status, page.encode("utf-8"), "text/html; charset=utf-8")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        try:
            if url.path == "/":
                self._search_page(url.query)
            elif url.path == "/api/search":
                text, similar, k = parse_query(url.query, PAGE_K)
                self._json(200, answer(self.searcher, text, similar, k))
            elif url.path.startswith("/image/") and url.path[len("/image/") :].isdigit():
                self._image(int(url.path[len("/image/") :]))
            else:
                self._json(404, {"error": f"no such page {url.path}; try /?q=TEXT or /api/search?q=TEXT&k=10"})
        except UsageError as err:
            self._json(400, {"error": str(err)}) if url.path != "/" else self._page(400, search_page(None, error=str(err)))
        except Exception as err:  # a fault of ours: a line on the server's stderr, a plain 500 to the client
            sys.stderr.write(f"error answering {quote(self.path)}: {type(err).__name__}: {err}\n")
            self._json(500, {"error": "the server failed to answer this request"})

    def _search_page(self, query_string: str) -> None:
        text, similar, k = parse_query(query_string, PAGE_K)
        if text is None and similar is None:
            self._page(200, search_page(None, k=k))
            return
        try:
            result = answer(self.searcher, text, similar, k)
        except UsageError as err:
            self._page(400, search_page(None, text or "", k, error=str(err)))
            return
        self._page(200, search_page(result, text or "", k))

    def _image(self, i: int) -> None:
        if i >= len(self.searcher):
            self._json(404, {"error": f"no image {i}: the index holds {len(self.searcher)}"})
            return
        try:
            body = self.searcher.thumbnail(i)
        except Exception as err:  # moved or damaged since indexing
            self._json(404, {"error": f"image {i} cannot be read: {type(err).__name__}"})
            return
        self._send(200, body, "image/jpeg")


def make_server(searcher: Searcher, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    """An HTTP server for ``searcher`` bound to ``host:port`` (port 0: any free one); call ``serve_forever()``."""
    handler = type("SearchHandler", (_Handler,), {"searcher": searcher})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port or --host") from None
    server.daemon_threads = True
    return server
