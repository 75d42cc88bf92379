"""The web viewer under `/ui/`: server-rendered pages (Jinja2) over the same records, store and prompt index
as the API, with a little vanilla JavaScript for the live parts (progress from the event stream, training
curves). No front-end build: the templates and the one script and stylesheet live in `app/ui/`.

Every page needs a session (`app.sessions`): without one it redirects to the sign-in page. Pages read
records through `records.get(..., owner)`, so another key's resources are 404 here exactly as in the API.
State-changing requests (sign-out, cancel) are POST forms with the session's CSRF token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from pathlib import Path as FsPath
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Path, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app import prompts as prompt_views
from app import sessions
from app.deps import RedisDep, SettingsDep, StoreDep
from app.downloads import ArchiveResponse
from app.events import EventsQuery, events_response
from core import evaluations, exports, jobs, prompts, records, trainings
from core.errors import ConflictError, MiadpoError, NotFoundError, UserError
from core.store import safe_join
from trainer.checkpoints import list_checkpoints

UI_DIR = FsPath(__file__).parent / "ui"
templates = Jinja2Templates(directory=str(UI_DIR / "templates"))
PAGE_SIZE = 24
# Training curves: the metrics a DPO step reports that the page draws (name, label).
CURVES = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"))


class SignInRequired(Exception):
    """No live session: the page redirects to sign-in, then back."""


class CsrfRefused(Exception):
    pass


class _ViewerRoute(APIRoute):
    """Errors as HTML pages (the API's JSON envelope is for programs), a missing session as a redirect."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/ui/signin?next={quote(target, safe='')}", status_code=303)
            except CsrfRefused:
                return _error_page(request, 403, "This form was refused (its security token is missing or stale). Reload the page and try again.")
            except MiadpoError as exc:
                return _error_page(request, exc.status_code, exc.message)

        return run


def _error_page(request: Request, status: int, message: str) -> Response:
    return templates.TemplateResponse(request, "error.html", {"status": status, "message": message, "session": None}, status_code=status)


router = APIRouter(prefix="/ui", route_class=_ViewerRoute, include_in_schema=False)


def _session(request: Request, redis: RedisDep) -> sessions.Session:
    session = sessions.lookup(redis, request.cookies.get(sessions.COOKIE))
    if session is None:
        raise SignInRequired
    return session


SessionDep = Annotated[sessions.Session, Depends(_session)]
Id = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-z]{2}_[0-9a-z]+$")]
Uid = Annotated[str, Path(max_length=64, pattern=r"^\d+-\d+$")]
After = Annotated[str | None, Query(max_length=64, pattern=r"^[a-z]{2}_[0-9a-z]+$")]


def _page(request: Request, name: str, session: sessions.Session, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"session": session, **context})


def _check_form(request: Request, session: sessions.Session, token: str | None) -> None:
    if not sessions.same_origin(request) or not sessions.csrf_ok(session.csrf, token):
        raise CsrfRefused


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


# --------------------------------------------------------------------------------------------------
# Sign-in, sign-out


def _set_cookie(response: Response, request: Request, name: str, value: str, *, max_age: int, path: str, secure: bool) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=path, httponly=True, samesite="strict",
        secure=secure or request.url.scheme == "https",
    )


def _signin_page(request: Request, settings: Any, next_url: str, error: str | None = None, status: int = 200) -> Response:
    token = sessions.secrets.token_urlsafe(24)
    response = templates.TemplateResponse(
        request, "signin.html", {"session": None, "csrf": token, "next": next_url, "error": error}, status_code=status
    )
    _set_cookie(response, request, sessions.SIGNIN_COOKIE, token, max_age=3600, path="/ui/signin", secure=settings.ui_secure_cookie)
    return response


@router.get("/signin")
def signin_form(request: Request, settings: SettingsDep, next: Annotated[str | None, Query(max_length=2000)] = None) -> Response:
    return _signin_page(request, settings, sessions.safe_next(next))


@router.post("/signin")
def signin(
    request: Request,
    redis: RedisDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=512)] = "",
    csrf: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/ui/",
) -> Response:
    expected = request.cookies.get(sessions.SIGNIN_COOKIE) or ""
    if not sessions.same_origin(request) or not expected or not sessions.csrf_ok(expected, csrf):
        return _signin_page(request, settings, sessions.safe_next(next), "The form expired; please sign in again.", 403)
    owner = sessions.known_owner(request, api_key.strip()) if api_key.strip() else None
    if owner is None:
        return _signin_page(request, settings, sessions.safe_next(next), "That API key is not valid.", 401)
    token = sessions.create(redis, owner, settings.ui_session_ttl_s)
    response = RedirectResponse(sessions.safe_next(next), status_code=303)
    _set_cookie(response, request, sessions.COOKIE, token, max_age=settings.ui_session_ttl_s, path=sessions.COOKIE_PATH, secure=settings.ui_secure_cookie)
    response.delete_cookie(sessions.SIGNIN_COOKIE, path="/ui/signin")
    return response


@router.post("/signout")
def signout(request: Request, session: SessionDep, redis: RedisDep, csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
    _check_form(request, session, csrf)
    sessions.destroy(redis, session)
    response = RedirectResponse("/ui/signin", status_code=303)
    response.delete_cookie(sessions.COOKIE, path=sessions.COOKIE_PATH)
    return response


@router.get("/")
def home(session: SessionDep) -> Response:
    return RedirectResponse("/ui/pairsets", status_code=303)


# --------------------------------------------------------------------------------------------------
# Lists


def _list_page(request: Request, session: sessions.Session, redis: Any, kind: str, title: str, after: str | None) -> HTMLResponse:
    items, has_more = records.list_page(redis, kind, session.owner, limit=PAGE_SIZE, after=after)
    next_url = f"{request.url.path}?after={items[-1]['id']}" if has_more and items else None
    return _page(request, f"{kind}s.html", session, title=title, items=items, next_url=next_url, first=after is not None)


@router.get("/datasets")
def datasets_page(request: Request, session: SessionDep, redis: RedisDep, after: After = None) -> HTMLResponse:
    return _list_page(request, session, redis, records.DATASET, "Datasets", after)


@router.get("/pairsets")
def pairsets_page(request: Request, session: SessionDep, redis: RedisDep, after: After = None) -> HTMLResponse:
    return _list_page(request, session, redis, records.PAIRSET, "Pair sets", after)


@router.get("/trainings")
def trainings_page(request: Request, session: SessionDep, redis: RedisDep, after: After = None) -> HTMLResponse:
    return _list_page(request, session, redis, records.TRAINING, "Trainings", after)


@router.get("/evaluations")
def evaluations_page(request: Request, session: SessionDep, redis: RedisDep, after: After = None) -> HTMLResponse:
    return _list_page(request, session, redis, records.EVALUATION, "Evaluations", after)


@router.get("/datasets/{dataset_id}")
def dataset_page(request: Request, dataset_id: Id, session: SessionDep, redis: RedisDep) -> HTMLResponse:
    dataset = records.get(redis, records.DATASET, dataset_id, session.owner)
    return _page(request, "dataset.html", session, title=f"Dataset {dataset_id}", d=dataset)


# --------------------------------------------------------------------------------------------------
# Pair sets


def _histograms(store: Any, pairset_id: str) -> list[str]:
    folder = exports.export_dir(store, pairset_id) / "histograms"
    return sorted(p.stem for p in folder.glob("*.png")) if folder.is_dir() else []


def _post_selection(store: Any, pairset_id: str) -> list[dict[str, Any]]:
    """Per format and image count: prompts, and what became of them (from the prompt index)."""
    path = prompts.index_path(store, pairset_id)
    if not path.is_file():
        return []
    index = prompts.load_index(path)
    table: dict[tuple[str, int], dict[str, Any]] = {}
    for fmt, n, outcome in zip(index["format"], index["n_images"], index["outcome"], strict=True):
        key = (prompts.FORMATS[int(fmt)], int(n))
        row = table.setdefault(key, {"format": key[0], "n_images": key[1], "prompts": 0, **dict.fromkeys(prompts.OUTCOMES, 0)})
        row["prompts"] += 1
        row[prompts.OUTCOMES[int(outcome)]] += 1
    return [table[k] for k in sorted(table)]


@router.get("/pairsets/{pairset_id}")
def pairset_page(request: Request, pairset_id: Id, session: SessionDep, redis: RedisDep, store: StoreDep) -> HTMLResponse:
    ps = records.get(redis, records.PAIRSET, pairset_id, session.owner)
    done = ps["status"] == "succeeded"
    return _page(
        request, "pairset.html", session, title=f"Pair set {pairset_id}", ps=ps,
        histograms=_histograms(store, pairset_id) if done else [],
        post_selection=_post_selection(store, pairset_id) if done else [],
        outcomes=prompts.OUTCOMES,
        terminal=ps["status"] in records.PAIRSET_TERMINAL,
    )


@router.get("/pairsets/{pairset_id}/events")
def pairset_events(request: Request, pairset_id: Id, session: SessionDep, redis: RedisDep, settings: SettingsDep) -> Any:
    """The pair set's event stream (server-sent events), for the live progress bar."""
    records.get(redis, records.PAIRSET, pairset_id, session.owner)
    after = request.headers.get("last-event-id")
    query = EventsQuery(limit=100, after=after if after and len(after) < 64 else None)
    return events_response(request, redis, settings.redis_url, records.PAIRSET, pairset_id, query)


@router.get("/pairsets/{pairset_id}/histograms/{name}.png")
def pairset_histogram(
    pairset_id: Id, name: Annotated[str, Path(max_length=64, pattern=r"^[a-z0-9_]+$")], session: SessionDep, redis: RedisDep, store: StoreDep
) -> Response:
    records.get(redis, records.PAIRSET, pairset_id, session.owner)
    path = safe_join(exports.export_dir(store, pairset_id) / "histograms", f"{name}.png")
    if not path.is_file():
        raise NotFoundError(f"no histogram {name}", code="histogram_not_found")
    return FileResponse(path, media_type="image/png")


@router.get("/pairsets/{pairset_id}/download")
def pairset_download(pairset_id: Id, session: SessionDep, redis: RedisDep, store: StoreDep) -> Response:
    prompt_views.succeeded_pairset(redis, pairset_id, session.owner)
    path = exports.build_archive(exports.export_dir(store, pairset_id), exports.archive_path(store, pairset_id), root=pairset_id)
    return ArchiveResponse(path, media_type=ArchiveResponse.media_type, filename=f"{pairset_id}.tar.gz")


@router.post("/pairsets/{pairset_id}/cancel")
def pairset_cancel(
    request: Request, pairset_id: Id, session: SessionDep, redis: RedisDep, csrf: Annotated[str, Form(max_length=128)] = ""
) -> Response:
    _check_form(request, session, csrf)
    records.request_cancel(redis, pairset_id, session.owner)
    jobs.stop_pairset(redis, pairset_id)
    return RedirectResponse(f"/ui/pairsets/{pairset_id}", status_code=303)


def _filters(format: str | None, n_images: str | None, outcome: str | None) -> prompts.Filters:
    """Filters from the browser's form: an empty select means any; anything unknown is refused."""
    if format and format not in prompts.FORMATS:
        raise UserError(f"unknown format {format!r}", code="invalid_filter", param="format")
    if outcome and outcome not in prompts.OUTCOMES:
        raise UserError(f"unknown outcome {outcome!r}", code="invalid_filter", param="outcome")
    if n_images and not n_images.isdigit():
        raise UserError(f"n_images must be a number, got {n_images!r}", code="invalid_filter", param="n_images")
    return prompts.Filters(format=format or None, n_images=int(n_images) if n_images else None, outcome=outcome or None)


@router.get("/pairsets/{pairset_id}/prompts")
def prompts_page(
    request: Request,
    pairset_id: Id,
    session: SessionDep,
    redis: RedisDep,
    store: StoreDep,
    format: Annotated[str | None, Query(max_length=16)] = None,
    n_images: Annotated[str | None, Query(max_length=3)] = None,
    outcome: Annotated[str | None, Query(max_length=20)] = None,
    after: Annotated[str | None, Query(max_length=64, pattern=r"^\d+-\d+$")] = None,
) -> HTMLResponse:
    ps = prompt_views.succeeded_pairset(redis, pairset_id, session.owner)
    filters = _filters(format, n_images, outcome)
    items, has_more, total = prompt_views.page(store, pairset_id, filters, limit=PAGE_SIZE, after=after, base="/ui")
    index = prompt_views.load_index(store, pairset_id)
    query = {k: v for k, v in (("format", filters.format), ("n_images", filters.n_images), ("outcome", filters.outcome)) if v is not None}
    next_url = f"{request.url.path}?{urlencode({**query, 'after': items[-1]['uid']})}" if has_more and items else None
    first_url = f"{request.url.path}?{urlencode(query)}" if after else None
    return _page(
        request, "prompts.html", session, title=f"Prompts of {pairset_id}", ps=ps, items=items, total=total,
        filters=filters, counts=prompts.counts(index), formats=prompts.FORMATS, outcomes=prompts.OUTCOMES,
        next_url=next_url, first_url=first_url, query=urlencode(query),
    )


@router.get("/pairsets/{pairset_id}/prompts/{uid}")
def prompt_page(request: Request, pairset_id: Id, uid: Uid, session: SessionDep, redis: RedisDep, store: StoreDep) -> HTMLResponse:
    ps = prompt_views.succeeded_pairset(redis, pairset_id, session.owner)
    row, record = prompt_views.record_of(store, pairset_id, uid)
    item = prompt_views.describe(pairset_id, row, record, base="/ui")
    rejected = item["candidates"][item["rejected"]] if item["rejected"] is not None else None
    return _page(request, "prompt.html", session, title=f"Prompt {uid}", ps=ps, p=item, rejected=rejected)


@router.get("/pairsets/{pairset_id}/prompts/{uid}/images/{index}")
def prompt_image(
    pairset_id: Id, uid: Uid, index: Annotated[int, Path(ge=0, le=64)], session: SessionDep, redis: RedisDep, store: StoreDep
) -> Response:
    """A prompt's image with its target outlined."""
    prompt_views.succeeded_pairset(redis, pairset_id, session.owner)
    return _png(prompt_views.image_png(store, pairset_id, uid, index, outlined=True))


@router.get("/pairsets/{pairset_id}/prompts/{uid}/candidates/{candidate}/heatmaps/{index}")
def prompt_heatmap(
    pairset_id: Id,
    uid: Uid,
    candidate: Annotated[int, Path(ge=0, le=64)],
    index: Annotated[int, Path(ge=0, le=64)],
    session: SessionDep,
    redis: RedisDep,
    store: StoreDep,
) -> Response:
    prompt_views.succeeded_pairset(redis, pairset_id, session.owner)
    return _png(prompt_views.heatmap_png(store, pairset_id, uid, candidate, index))


# --------------------------------------------------------------------------------------------------
# Trainings and evaluations


def _checkpoints(store: Any, training_id: str) -> list[dict[str, Any]]:
    return [
        {"step": c.step, "metrics": {k: v for k, v in c.metrics.items() if isinstance(v, int | float) and math.isfinite(v)}, "created_at": int(c.created_at)}
        for c in list_checkpoints(trainings.output_dir(store, training_id))
    ]


@router.get("/trainings/{training_id}")
def training_page(request: Request, training_id: Id, session: SessionDep, redis: RedisDep, store: StoreDep) -> HTMLResponse:
    tr = records.get(redis, records.TRAINING, training_id, session.owner)
    return _page(
        request, "training.html", session, title=f"Training {training_id}", tr=tr, checkpoints=_checkpoints(store, training_id),
        curves=CURVES, terminal=tr["status"] in records.TRAINING_TERMINAL,
    )


@router.get("/trainings/{training_id}/metrics")
def training_metrics(training_id: Id, session: SessionDep, redis: RedisDep) -> JSONResponse:
    """The training's curves so far (one point per `step` event) and its status, for the page's polling."""
    tr = records.get(redis, records.TRAINING, training_id, session.owner)
    points: dict[str, list[list[float]]] = {name: [] for name, _ in CURVES}
    after = None
    while True:
        events, has_more = records.read_events(redis, training_id, after=after, limit=1000)
        for event in events:
            if event["type"] in ("step", "checkpoint") and "step" in event["data"]:
                for name in points:
                    value = event["data"].get("metrics", {}).get(name)
                    if isinstance(value, int | float):
                        points[name].append([event["data"]["step"], value])
        if not has_more or not events:
            break
        after = events[-1]["id"]
    for name, values in points.items():  # a checkpoint repeats its step's metrics: one point per step
        points[name] = sorted({int(s): [s, v] for s, v in values}.values())
    return JSONResponse({"status": tr["status"], "progress": tr["progress"], "metrics": tr["metrics"], "curves": points})


@router.get("/trainings/{training_id}/adapter")
def training_adapter(training_id: Id, session: SessionDep, redis: RedisDep, store: StoreDep) -> Response:
    tr = records.get(redis, records.TRAINING, training_id, session.owner)
    if tr["status"] != "succeeded":
        raise ConflictError(f"training {training_id} is {tr['status']}: the adapter exists once it has succeeded", code="training_not_succeeded")
    path = trainings.build_adapter_archive(store, training_id)
    return ArchiveResponse(path, media_type=ArchiveResponse.media_type, filename=path.name)


@router.get("/trainings/{training_id}/checkpoints/{step}")
def training_checkpoint(training_id: Id, step: Annotated[int, Path(ge=0)], session: SessionDep, redis: RedisDep, store: StoreDep) -> Response:
    records.get(redis, records.TRAINING, training_id, session.owner)
    found = {c.step: c for c in list_checkpoints(trainings.output_dir(store, training_id))}
    if step not in found:
        raise NotFoundError(f"training {training_id} has no checkpoint at step {step}", code="checkpoint_not_found")
    path = trainings.build_checkpoint_archive(store, training_id, step, found[step].path)
    return ArchiveResponse(path, media_type=ArchiveResponse.media_type, filename=f"{training_id}-checkpoint-{step}.tar.gz")


@router.post("/trainings/{training_id}/cancel")
def training_cancel(
    request: Request, training_id: Id, session: SessionDep, redis: RedisDep, csrf: Annotated[str, Form(max_length=128)] = ""
) -> Response:
    _check_form(request, session, csrf)
    records.request_training_cancel(redis, training_id, session.owner)
    jobs.stop_training(redis, training_id)
    return RedirectResponse(f"/ui/trainings/{training_id}", status_code=303)


def _confused(store: Any, evaluation_id: str, limit: int = 8) -> list[dict[str, Any]]:
    """The first answers that named another image's truth (the failure MIA-DPO targets)."""
    path = evaluations.samples_path(store, evaluation_id)
    found: list[dict[str, Any]] = []
    after = None
    while path.is_file() and len(found) < limit:
        page, has_more = evaluations.samples_page(path, limit=200, after=after)
        found += [s for s in page if s.get("confused_with") is not None][: limit - len(found)]
        if not has_more or not page:
            break
        after = page[-1]["uid"]
    return found


@router.get("/evaluations/{evaluation_id}")
def evaluation_page(request: Request, evaluation_id: Id, session: SessionDep, redis: RedisDep, store: StoreDep) -> HTMLResponse:
    ev = records.get(redis, records.EVALUATION, evaluation_id, session.owner)
    columns = {"this model": ev}
    # An evaluation a training made of itself (`report_to`) has a twin, base or adapter: side by side.
    link = (ev.get("report_to") or {}).get("training_id")
    if link:
        tr = records.find(redis, records.TRAINING, link)
        pair = (tr or {}).get("evaluation") or {}
        if tr and tr.get("owner") == session.owner and pair.get("base") and pair.get("adapter"):
            columns = {}
            for role in ("base", "adapter"):
                other = records.find(redis, records.EVALUATION, pair[role]["id"])
                if other is not None and other.get("owner") == session.owner:
                    columns[role] = other
    return _page(
        request, "evaluation.html", session, title=f"Evaluation {evaluation_id}", ev=ev, columns=columns,
        confused=_confused(store, evaluation_id) if ev["status"] == "succeeded" else [],
    )


def install(app: Any) -> None:
    """Mount the viewer: its pages and its static files (the script and the stylesheet, no secrets)."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=str(UI_DIR / "static")), name="ui-static")
