"""The web application of ``protopnet serve``: pages for people, a JSON API for programs.

Pages (HTML, links relative to the app's root, so it works behind a reverse proxy under a prefix
given with ``--root-path``):

* ``GET /``: drop or choose a picture; ``POST /explain``: its score sheets, rendered by the HTML
  report's own functions (:func:`protopnet.explain.report.explanation_report`).
* ``GET /prototypes/``: the prototype gallery (with ``--data``: the analysis report with each
  prototype's nearest training and test patches).
* ``GET /edit``, ``POST /edit``, ``POST /save`` (token needed): remove or relabel prototypes with a
  reason, re-fit the last layer, compare test accuracy, save as a new model directory.

API (JSON): ``GET /healthz``, ``GET /api/model``, ``POST /api/explain`` (a picture in, the
``explanation.json`` schema out), ``POST /api/edit`` and ``POST /api/save`` (token needed, as
``Authorization: Bearer TOKEN``). Errors are ``{"error": message}`` with a 4xx status; nothing a
request sends can stop the server or reach a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .session import ModelSession
from .uploads import RequestError, UploadLimits, decode_picture, display_name

logger = logging.getLogger(__name__)

FORM_FIELD_BYTES = 64 * 1024
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
)
SERVE_CSS = """
nav.top { display: flex; gap: 18px; align-items: baseline; border-bottom: 1px solid var(--line); padding-bottom: 8px; margin-bottom: 14px; }
nav.top .model { margin-left: auto; color: var(--muted); font-size: 13px; }
.error { background: #fde7e4; border-left: 4px solid var(--bad); padding: 8px 14px; }
.done { background: #e6f4ea; border-left: 4px solid var(--good); padding: 8px 14px; }
form.upload { border: 2px dashed var(--line); border-radius: 8px; padding: 22px; text-align: center; background: var(--bg); }
form.upload.dragging { border-color: var(--accent); background: #eaf2fb; }
form.upload label { display: block; font-size: 17px; margin-bottom: 10px; }
form.upload.compact { padding: 10px; text-align: left; }
button { font: inherit; padding: 5px 14px; border-radius: 6px; border: 1px solid var(--accent); background: var(--accent); color: #fff; cursor: pointer; }
input[type=text], input[type=number], input[type=password], select { font: inherit; padding: 3px 6px; border: 1px solid var(--line); border-radius: 4px; }
table.edit td { vertical-align: middle; }
table.edit input.reason { width: 260px; }
.accuracy .changed { font-weight: 700; }
pre.json { background: var(--bg); padding: 10px; overflow-x: auto; font-size: 12px; }
"""


class BodyTooLarge(Exception):
    """The request body grew past the limit while it was read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request is larger than the limit of {limit} bytes")
        self.limit = limit


class Guard:
    """Pure ASGI middleware: body size limit (declared and counted), security headers, and an
    access log that never shows query strings (the token may be in one)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 0}
        limit = self.max_bytes

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > limit
        except ValueError:
            too_big = False
        if too_big:
            if int(declared) <= 4 * limit:  # read and drop it, so that the client sees the answer, not a broken pipe
                message = {"more_body": True}
                while message.get("more_body") and message.get("type", "http.request") == "http.request":
                    message = await receive()
            response = _error_response(scope, 413, f"the request is {int(declared)} bytes; the limit is {limit} bytes")
            await response(scope, receive, send_with_headers)
        else:
            seen = {"bytes": 0}

            async def counted() -> dict:
                message = await receive()
                if message["type"] == "http.request":
                    seen["bytes"] += len(message.get("body", b""))
                    if seen["bytes"] > limit:
                        raise BodyTooLarge(limit)
                return message

            try:
                await self.app(scope, counted, send_with_headers)
            except Exception:  # noqa: BLE001 - already answered (500) and logged by ServeApp._on_crash
                if status["code"] == 0:
                    await _error_response(scope, 500, "the server failed on this request (see its log); it keeps serving")(scope, receive, send_with_headers)
        logger.info("%s %s %d %.0f ms", scope.get("method"), _route_path(scope), status["code"], 1000 * (time.perf_counter() - started))


def _route_path(scope: dict) -> str:
    """The path inside the app (without the ``--root-path`` prefix that uvicorn puts in front)."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", "")).rstrip("/")
    return path[len(root):] or "/" if root and (path == root or path.startswith(root + "/")) else path


def _wants_json(scope: dict) -> bool:
    path = _route_path(scope)
    return path.startswith("/api/") or path == "/healthz"


def _error_response(scope: dict, status: int, message: str) -> Response:
    if _wants_json(scope):
        return JSONResponse({"error": message, "status": status}, status_code=status)
    from html import escape

    return HTMLResponse(
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Error {status}</title></head>"
        f"<body><h1>Error {status}</h1><p class=\"error\" role=\"alert\">{escape(message)}</p>"
        f"<p><a href=\"{escape(scope.get('root_path', ''))}/\">Back to the start page</a></p></body></html>",
        status_code=status,
    )


class ServeApp:
    """The routes over a :class:`ModelSession`; :attr:`app` is the ASGI application.

    Args:
        session: the served model.
        token: the secret that edits and saves need (``secrets.token_urlsafe`` when None).
        limits: upload limits.
        max_waiting: explanations queued at most; more are answered 503 with ``Retry-After``.
        picture_rows: score-sheet rows drawn with pictures on the explanation page.
    """

    def __init__(self, session: ModelSession, *, token: str | None = None, limits: UploadLimits | None = None,
                 max_waiting: int = 32, picture_rows: int = 10) -> None:
        import jinja2

        self.session = session
        self.token = token or secrets.token_urlsafe(24)
        self.limits = limits or UploadLimits()
        self.max_waiting = int(max_waiting)
        self.picture_rows = int(picture_rows)
        self.waiting = 0
        folder = resources.files("protopnet.serve")
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(folder / "templates")),
            autoescape=jinja2.select_autoescape(("html",), default=True),
            undefined=jinja2.StrictUndefined,
        )
        self.script = (folder / "static" / "serve.js").read_bytes()
        from .. import __version__
        from .report_parts import stylesheet

        self.css = stylesheet() + SERVE_CSS
        self.version = __version__
        routes = [
            Route("/", self.home, methods=["GET"]),
            Route("/explain", self.explain_page, methods=["POST"]),
            Route("/prototypes", lambda request: RedirectResponse(_root(request) + "/prototypes/", 308), methods=["GET"]),
            Route("/prototypes/", self.gallery, methods=["GET"]),
            Route("/prototypes/{name:path}", self.gallery_file, methods=["GET"]),
            Route("/pictures/{prototype:int}/{kind}.png", self.prototype_picture, methods=["GET"]),
            Route("/edit", self.edit_page, methods=["GET"]),
            Route("/edit", self.edit_submit, methods=["POST"]),
            Route("/save", self.save_submit, methods=["POST"]),
            Route("/static/serve.js", self.static_script, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/api/model", self.api_model, methods=["GET"]),
            Route("/api/explain", self.api_explain, methods=["POST"]),
            Route("/api/edit", self.api_edit, methods=["POST"]),
            Route("/api/save", self.api_save, methods=["POST"]),
        ]
        handlers = {
            RequestError: self._on_request_error,
            BodyTooLarge: self._on_too_large,
            HTTPException: self._on_http_error,
            Exception: self._on_crash,
        }
        app = Starlette(routes=routes, exception_handlers=handlers)
        self.app = Guard(app, self.limits.max_bytes)

    # -- plumbing -----------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("error", None)
        context.setdefault("subtitle", None)
        page = self.templates.get_template(template).render(
            base=_root(request) + "/", site=str(request.base_url), css=self.css, version=self.version, name=self.session.name,
            editable=self.session.editable, **context,
        )
        return HTMLResponse(page, status_code=status)

    async def _on_request_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestError)
        logger.info("refused %s %s: %s", request.method, _route_path(request.scope), error.message)
        if not _wants_json(request.scope) and _route_path(request.scope) in ("/", "/explain"):
            response: Response = self.render(request, "home.html", status=error.status, title="Explain a picture", error=error.message, info=self.session.info())
        else:
            response = _error_response(request.scope, error.status, error.message)
        if error.status == 503:
            response.headers["Retry-After"] = "1"
        return response

    async def _on_too_large(self, request: Request, error: Exception) -> Response:
        return await self._on_request_error(request, RequestError(413, str(error)))

    async def _on_http_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        message = error.detail if isinstance(error.detail, str) else "bad request"
        if error.status_code == 404:
            message = "no such page"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed here"
        return _error_response(request.scope, error.status_code, message)

    async def _on_crash(self, request: Request, error: Exception) -> Response:
        logger.error("failure on %s %s", request.method, _route_path(request.scope), exc_info=error)
        return _error_response(request.scope, 500, "the server failed on this request (see its log); it keeps serving")

    def check_token(self, request: Request, form: FormData | None = None) -> None:
        """Refuse (401 without a token, 403 with a wrong one) unless the request carries the token
        in ``Authorization: Bearer``, a ``token`` form field, or (GET pages) the query string."""
        given = None
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        elif form is not None and isinstance(form.get("token"), str):
            given = str(form.get("token"))
        elif request.method == "GET":
            given = request.query_params.get("token")
        if not given:
            raise RequestError(401, "this needs the token printed when the server started (Authorization: Bearer TOKEN)")
        if not secrets.compare_digest(given.encode("utf-8", "replace"), self.token.encode("utf-8")):
            raise RequestError(403, "wrong token: use the one printed when the server started")

    async def read_picture(self, request: Request) -> tuple[bytes, str | None, FormData | None]:
        """(the picture's bytes, the client's file name cleaned, the other form fields)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=20, max_part_size=FORM_FIELD_BYTES)
            upload = form.get("image")
            if upload is None:
                upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise RequestError(400, "no picture in the form: send it as the file field 'image'")
            data = await upload.read()
            await upload.close()
            return data, display_name(upload.filename), form
        if kind.startswith("image/") or kind in ("application/octet-stream", ""):
            return await request.body(), None, None
        raise RequestError(415, f"content type {kind[:60]!r} is not accepted: send an image (image/*, application/octet-stream) or a multipart form with the field 'image'")

    async def explained(self, request: Request, data: bytes, top_classes: int, top_prototypes: int) -> Any:
        if self.waiting >= self.max_waiting:
            raise RequestError(503, f"busy: {self.waiting} pictures are waiting; try again in a moment")
        self.waiting += 1
        try:
            picture = await run_in_threadpool(decode_picture, data, self.limits)
            return await run_in_threadpool(self.session.explain, picture, top_classes, top_prototypes)
        finally:
            self.waiting -= 1

    # -- pages --------------------------------------------------------------------------------------
    async def home(self, request: Request) -> Response:
        return self.render(request, "home.html", title="Explain a picture", info=self.session.info())

    async def explain_page(self, request: Request) -> Response:
        data, filename, form = await self.read_picture(request)
        top = _int_field(form.get("top_classes") if form else None, "top_classes", 3, 1, 50)
        explanation = await self.explained(request, data, top, 10)
        fragment = await run_in_threadpool(self.session.report_html, explanation, self.picture_rows)
        name = explanation.class_names[explanation.predicted]
        return self.render(request, "explanation.html", title=f"Why the model thinks this is “{name}”", subtitle=filename, fragment=fragment)

    async def gallery(self, request: Request) -> Response:
        files = await run_in_threadpool(self.session.gallery_files)
        if files is None:
            kinds = self.session.prototype_picture_kinds()
            return self.render(request, "gallery.html", title="Prototypes", info=self.session.info(), kinds=kinds)
        page = files["index.html"].decode("utf-8")
        nav = self.templates.get_template("nav.html").render(base=_root(request) + "/", name=self.session.name, editable=self.session.editable)
        page = page.replace("<main>", "<main>\n" + nav, 1)
        return HTMLResponse(page)

    async def gallery_file(self, request: Request) -> Response:
        files = await run_in_threadpool(self.session.gallery_files)
        name = request.path_params["name"]
        data = None if files is None or name == "index.html" else files.get(name)  # a dict key, never a path
        if data is None:
            raise HTTPException(404)
        return Response(data, media_type="image/png" if name.endswith(".png") else "application/octet-stream")

    async def prototype_picture(self, request: Request) -> Response:
        data = await run_in_threadpool(self.session.prototype_picture, request.path_params["prototype"], request.path_params["kind"])
        if data is None:
            raise HTTPException(404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    async def edit_page(self, request: Request) -> Response:
        if not self.session.editable:
            raise RequestError(409, "editing needs the model's training data: start the server with --data DIR")
        if not request.query_params.get("token"):
            return self.render(request, "token.html", status=401, title="Edit the prototypes")
        self.check_token(request)
        return self.render_edit(request)

    def render_edit(self, request: Request, status: int = 200, error: str | None = None, form: FormData | None = None) -> Response:
        info = self.session.info()
        return self.render(request, "edit.html", status=status, title="Edit the prototypes", info=info, error=error,
                           kinds=self.session.prototype_picture_kinds(), token=self.token, form=form or {})

    async def edit_submit(self, request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=10_000, max_part_size=FORM_FIELD_BYTES)
        self.check_token(request, form)
        remove = form.getlist("remove")
        relabel, reasons = {}, {}
        for key, value in form.multi_items():
            if key.startswith("relabel-") and isinstance(value, str) and value.strip():
                relabel[key[8:]] = value.strip()
            elif key.startswith("reason-") and isinstance(value, str) and value.strip():
                reasons[key[7:]] = value
        iterations = _int_field(form.get("iterations"), "iterations", 20, 0, 1000)
        try:
            draft = await run_in_threadpool(self.session.edit, remove, relabel, reasons, iterations)
        except RequestError as error:
            if error.status != 400:
                raise
            return self.render_edit(request, 400, error.message, form)
        return self.render(request, "edited.html", title="The edit, before it is saved", draft=draft.to_json(),
                           token=self.token, info=self.session.info())

    async def save_submit(self, request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=20, max_part_size=FORM_FIELD_BYTES)
        self.check_token(request, form)
        path = await run_in_threadpool(self.session.save, form.get("draft"))
        history = json.loads((path / "model.json").read_text(encoding="utf-8")).get("history", [])
        return self.render(request, "saved.html", title="Saved as a new model", path=str(path), event=json.dumps(history[-1] if history else {}, indent=1))

    async def static_script(self, request: Request) -> Response:
        return Response(self.script, media_type="text/javascript")

    # -- API ------------------------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.session.name, "uptime_s": round(time.time() - self.session.started, 1),
                             "explained": self.session.explained})

    async def api_model(self, request: Request) -> Response:
        return JSONResponse(_finite(self.session.info()))

    async def api_explain(self, request: Request) -> Response:
        top = _int_field(request.query_params.get("top_classes"), "top_classes", 3, 1, 1000)
        protos = _int_field(request.query_params.get("top_prototypes"), "top_prototypes", 10, 0, 10_000)
        data, _, _ = await self.read_picture(request)
        explanation = await self.explained(request, data, top, protos)
        body = await run_in_threadpool(lambda: _finite(explanation.to_json()))
        return JSONResponse(body)

    async def _json_body(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        return body

    async def api_edit(self, request: Request) -> Response:
        self.check_token(request)
        body = await self._json_body(request)
        unknown = sorted(set(body) - {"remove", "relabel", "reasons", "iterations"})
        if unknown:
            raise RequestError(400, f"unknown field(s) {unknown}; allowed: remove, relabel, reasons, iterations")
        remove, relabel, reasons = body.get("remove", []), body.get("relabel", {}), body.get("reasons", {})
        if not isinstance(remove, list) or not isinstance(relabel, dict) or not isinstance(reasons, dict):
            raise RequestError(400, "remove must be a list of prototype indices; relabel and reasons objects keyed by prototype index")
        draft = await run_in_threadpool(self.session.edit, remove, relabel, reasons, body.get("iterations", 20))
        return JSONResponse(_finite(draft.to_json()))

    async def api_save(self, request: Request) -> Response:
        self.check_token(request)
        body = await self._json_body(request)
        path = await run_in_threadpool(self.session.save, body.get("draft"))
        return JSONResponse({"out": str(path), "name": path.name})


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _int_field(value: Any, name: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(str(value).strip())
    except ValueError:
        raise RequestError(400, f"{name} must be a whole number from {low} to {high}, got {str(value)[:40]!r}") from None
    if not low <= number <= high:
        raise RequestError(400, f"{name} must be from {low} to {high}, got {number}")
    return number


def _finite(obj: Any) -> Any:
    """JSON without NaN or infinities (strict parsers refuse them): they become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def create_app(session: ModelSession, **kwargs: Any) -> ServeApp:
    """The ASGI application serving ``session`` (see :class:`ServeApp` for the options)."""
    return ServeApp(session, **kwargs)


def session_for(model_dir: str | Path, data: str | None = None, *, device: str = "cpu", out: str | Path | None = None,
                gallery_k: int = 5, batch_size: int = 64) -> ModelSession:
    """Load a model directory (and its ``--data``, prepared as ``protopnet edit`` does) into a session."""
    from ..checkpoint import load_model
    from ..data import DataSpecError, dataset_for_model
    from ..runtime import resolve_device

    model = load_model(str(model_dir), device=resolve_device(device))
    directory = Path(getattr(model, "source_directory", None) or model_dir)

    def dataset(split: str) -> Any:
        try:
            return dataset_for_model(model, str(data), split)
        except DataSpecError as error:
            raise ValueError(f"--data {error}") from None

    train = test = None
    if data is not None:
        train = dataset("train")
        try:
            test = dataset("test")
        except (ValueError, OSError) as error:
            logger.warning("no test split in %s (%s): accuracy is measured on the training data only", data, error)
    return ModelSession(model, directory, train=train, test=test, save_root=out, gallery_k=gallery_k, batch_size=batch_size)
