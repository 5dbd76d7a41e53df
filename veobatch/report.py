"""The morning report: ``DIR/report.html``, one self-contained page with a card per job.

Everything comes from the output directory (the ledger, results.json and the videos), so
``veobatch report DIR`` works without the manifest. The page loads nothing from the network:
styles and script are inline, thumbnails are ``data:`` JPEGs, videos play from their relative
file, and a Content-Security-Policy forbids anything else even if a string slipped through.
Pure core: :class:`Card`, :func:`card_for`, :func:`render_head`, :func:`render_card`,
:func:`render_foot` (:func:`render_html` joins them). Shell: :func:`write_report`, which streams
the page to disk card by card.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import json
import logging
import os
import stat
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from .fsutil import atomic_writer, is_regular, open_regular
from .jobs import Job
from .jobview import compact_request, expected_video, list_price_usd, parameters
from .ledger import JobState, current_results, load_states
from .verify import Probe, compare, probe_video, thumbnail_jpeg

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
THUMBS_DIR = ".thumbs"  # cached thumbnails, so a second report does not decode again
THUMB_ID_MAX_LEN = 200  # of the id in a thumbnail's name, which adds "-<12 hex>.jpg"
GROUPS = ("done", "failed", "uncertain", "unfinished")
_GROUP_OF = {
    "done": "done",
    "failed": "failed",
    "uncertain": "uncertain",
    "submitting": "uncertain",
}
# Costs are counted for jobs that reached the API and got a generation id.
_BILLED = frozenset({"submitted", "completed", "done", "failed"})


@dataclass(frozen=True)
class Card:
    """One job as the report shows it."""

    id: str
    status: str
    model: str
    prompt: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    generation_id: str | None = None
    error: str | None = None
    flags: tuple[str, ...] = ()
    video: Probe | None = None
    file: str | None = None  # relative to the report; set only when the file is there
    file_bytes: int | None = None
    gen_time_s: float | None = None
    cost_usd: float | None = None
    cost_basis: str = "list price"  # or "reported by the API", "estimate at submission"
    thumb: bytes | None = None  # JPEG

    @property
    def group(self) -> str:
        return _GROUP_OF.get(self.status, "unfinished")


def card_for(
    row: Mapping[str, Any], state: JobState | None, request: Mapping[str, Any] | None
) -> Card:
    """A card from a results.json row, the ledger's state and the request (all optional)."""
    model = str(row.get("model") or (state.model if state else "") or "")
    req = dict(request or {})
    err = row.get("error") or {}
    gen_time = None
    if state and state.submitted_at is not None and state.completed_at is not None:
        gen_time = max(0.0, state.completed_at - state.submitted_at)
    billed = state is not None and state.status in _BILLED and state.generation_id is not None
    if state is not None and state.error is not None and state.error.kind == "generation_error":
        billed = False  # a generation that ends in error is not billed
    cost, basis = (list_price_usd(model, req) if billed and model else None), "list price"
    if billed and state is not None and state.usd_spent is not None:
        cost, basis = state.usd_spent, "reported by the API"
    elif billed and state is not None and state.usd_estimate is not None:
        cost, basis = state.usd_estimate, "estimate at submission"
    return Card(
        id=str(row.get("id")),
        status=str(row.get("status")),
        model=model,
        prompt=str(req["prompt"]) if "prompt" in req else None,
        params=parameters(req),
        generation_id=row.get("generation_id"),
        error=f"{err.get('kind')}: {err.get('message')}" if err else None,
        flags=tuple(row.get("flags") or ()),
        video=Probe.from_json(row.get("video")),
        file=row.get("file") if row.get("status") == "done" else None,
        file_bytes=row.get("bytes"),
        gen_time_s=gen_time,
        cost_usd=cost,
        cost_basis=basis,
    )


# -- rendering -----------------------------------------------------------------------------

_CSS = """
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d2330;--dim:#667085;--line:#e4e7ec;--ok:#12805c;
--bad:#c4320a;--warn:#b54708;--info:#175cd3}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,
sans-serif;background:var(--bg);color:var(--ink)}header{padding:18px 24px 8px;
background:var(--card);border-bottom:1px solid var(--line);position:sticky;top:0;z-index:1}
h1{font-size:20px;margin:0 0 4px}
.meta{color:var(--dim);margin:0 0 10px}.filters{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0}
.filters button{font:inherit;border:1px solid var(--line);background:var(--bg);border-radius:999px;
padding:4px 12px;cursor:pointer}.filters button[aria-pressed=true]{background:var(--ink);color:#fff;
border-color:var(--ink)}main{display:grid;grid-template-columns:repeat(auto-fill,minmax(290px,1fr));
gap:16px;padding:16px 24px 40px}.card{background:var(--card);border:1px solid var(--line);
border-radius:10px;overflow:hidden;display:flex;flex-direction:column}.card.flagged{border-color:var(--warn)}
.media{background:#101828;display:flex;align-items:center;justify-content:center;height:200px;
position:relative}.media img,.media video{max-width:100%;max-height:200px;display:block}
.media.empty{height:64px;background:#eaecf0}.media img{cursor:pointer}
.media .play{position:absolute;color:#fff;font-size:34px;text-shadow:0 1px 6px #000;
pointer-events:none}.media .none{color:var(--dim)}.body{padding:10px 12px}
.head{display:flex;justify-content:space-between;gap:8px;align-items:baseline}
.id{font:600 14px ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.badge{font-size:12px;border-radius:999px;padding:1px 8px;color:#fff;white-space:nowrap;
background:var(--dim)}.s-done{background:var(--ok)}.s-failed{background:var(--bad)}
.s-uncertain,.s-submitting{background:var(--warn)}.s-submitted,.s-completed{background:var(--info)}
.prompt{margin:6px 0;max-height:7.5em;overflow:auto;white-space:pre-wrap}
.error{color:var(--bad);margin:6px 0;word-break:break-word}.flags{color:var(--warn);margin:6px 0;
padding-left:18px}dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 10px;margin:6px 0 0;
color:var(--dim);font-size:13px}dd{margin:0;color:var(--ink);overflow-wrap:anywhere}
body[data-filter=done] .card:not([data-group=done]),
body[data-filter=failed] .card:not([data-group=failed]),
body[data-filter=uncertain] .card:not([data-group=uncertain]),
body[data-filter=unfinished] .card:not([data-group=unfinished]),
body[data-filter=flagged] .card:not([data-flagged]){display:none}
"""

# Filters follow the URL's #fragment (bookmarkable); a thumbnail click swaps in the video.
# On load the page records what rendered, so a headless browser can check it (and so can you).
# With ?selftest=play the first video starts before the load event, which a media element delays
# until its first frame is in: on load, the video has decoded or failed.
_JS = """
(function(){
var F=["all","done","failed","uncertain","unfinished","flagged"];
var bs=[].slice.call(document.querySelectorAll(".filters button"));
var out=document.getElementById("selfcheck");
function apply(f){if(F.indexOf(f)<0)f="all";document.body.setAttribute("data-filter",f);
bs.forEach(function(b){b.setAttribute("aria-pressed",String(b.getAttribute("data-f")===f))});
var n=[].slice.call(document.querySelectorAll(".card")).filter(function(c){
return c.offsetParent!==null}).length;document.getElementById("shown").textContent=n;
out.setAttribute("data-filter",f);out.setAttribute("data-visible",String(n))}
bs.forEach(function(b){b.addEventListener("click",function(){var f=b.getAttribute("data-f");
history.replaceState(null,"","#"+f);apply(f)})});
window.addEventListener("hashchange",function(){apply(location.hash.slice(1))});
function play(img){var v=document.createElement("video");v.controls=true;v.autoplay=true;
v.muted=img.hasAttribute("data-muted");v.setAttribute("playsinline","");v.poster=img.src;
v.src=img.getAttribute("data-video");img.parentNode.replaceChild(v,img);
var p=v.parentNode.querySelector(".play");if(p)p.remove();return v}
document.addEventListener("click",function(e){var t=e.target;
if(t&&t.matches&&t.matches("img.thumb"))play(t)});
var imgs=[].slice.call(document.querySelectorAll("img.thumb")),n=imgs.length,v=null;
if(/[?&]selftest=play/.test(location.search)&&n){imgs[0].setAttribute("data-muted","");
v=play(imgs[0]);v.addEventListener("error",function(){out.setAttribute("data-video-error","1")})}
window.addEventListener("load",function(){apply(location.hash.slice(1));
out.setAttribute("data-cards",String(document.querySelectorAll(".card").length));
out.setAttribute("data-thumbs",String(n));
out.setAttribute("data-thumbs-ok",String(imgs.filter(function(i){
return i.complete&&i.naturalWidth>0}).length));
if(v&&v.readyState>0)out.setAttribute("data-video-width",String(v.videoWidth));
document.documentElement.setAttribute("data-rendered","1")})})();
"""

_CSP = (
    "default-src 'none'; img-src data:; media-src 'self'; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _size(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def _param_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items())


def _media(card: Card) -> str:
    if card.thumb and card.file:
        src = "data:image/jpeg;base64," + base64.b64encode(card.thumb).decode()
        return (
            f'<img class="thumb" src="{src}" alt="frame of {_e(card.id)}" '
            f'data-video="{_e(quote(card.file))}" title="play"><span class="play">▶</span>'
        )
    if card.file:
        return f'<a class="none" href="{_e(quote(card.file))}">no preview: open the video</a>'
    text = "file missing" if card.status == "done" else "no video"
    return f'<span class="none">{text}</span>'


def _details(card: Card) -> str:
    rows: list[tuple[str, str]] = [("model", card.model.removeprefix("google/"))]
    if card.params:
        rows.append(("parameters", _param_text(card.params)))
    if card.video:
        rows.append(("video", card.video.describe()))
    if card.file_bytes is not None:
        rows.append(("file size", _size(card.file_bytes)))
    if card.gen_time_s is not None:
        rows.append(("generation", f"{card.gen_time_s:.0f} s"))
    if card.cost_usd is not None:
        rows.append(("cost", f"${card.cost_usd:.2f} ({card.cost_basis})"))
    if card.generation_id:
        rows.append(("generation id", card.generation_id))
    return "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)


def render_card(card: Card) -> str:
    """One card's ``<article>``, its thumbnail inline."""
    flagged = " data-flagged" if card.flags else ""
    klass = "card flagged" if card.flags else "card"
    media = "media" if card.thumb and card.file else "media empty"
    prompt = f'<p class="prompt">{_e(card.prompt)}</p>' if card.prompt else ""
    error = f'<p class="error">{_e(card.error)}</p>' if card.error else ""
    flags = (
        '<ul class="flags">' + "".join(f"<li>{_e(f)}</li>" for f in card.flags) + "</ul>"
        if card.flags
        else ""
    )
    return (
        f'<article class="{klass}" id="job-{_e(card.id)}" data-status="{_e(card.status)}" '
        f'data-group="{card.group}"{flagged}><div class="{media}">{_media(card)}</div>'
        f'<div class="body"><div class="head"><span class="id">{_e(card.id)}</span>'
        f'<span class="badge s-{_e(card.status)}">{_e(card.status)}</span></div>'
        f"{prompt}{error}{flags}<dl>{_details(card)}</dl></div></article>"
    )


def _filters(cards: Sequence[Card]) -> str:
    groups = Counter(c.group for c in cards)
    counts = {"all": len(cards), **{g: groups[g] for g in GROUPS}}
    counts["flagged"] = sum(1 for c in cards if c.flags)
    return "".join(
        f'<button type="button" data-f="{f}" aria-pressed="{str(f == "all").lower()}">'
        f"{f} {n}</button>"
        for f, n in counts.items()
    )


def render_head(cards: Sequence[Card], *, title: str, generated_at: float) -> str:
    """The page up to the first card: its counts and sizes need the cards' small fields only,
    never their thumbnails, so the cards can be written one by one after it."""
    statuses = Counter(c.status for c in cards)
    spend = sum(c.cost_usd or 0.0 for c in cards)
    size = sum(c.file_bytes or 0 for c in cards if c.file)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(generated_at))
    summary = ", ".join(f"{n} {s}" for s, n in statuses.most_common())
    meta = (
        f"{len(cards)} job{'s' * (len(cards) != 1)}: {summary or 'none'} · "
        f"{_size(size) or '0 kB'} of video · "
        f"about ${spend:,.2f} spent · generated {stamp}"
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f'<body data-filter="all"><header><h1>{_e(title)}</h1><p class="meta">{_e(meta)}</p>'
        f'<nav class="filters">{_filters(cards)}</nav><p class="meta">showing '
        f'<span id="shown">{len(cards)}</span> · click a picture to play the video</p>'
        '<output id="selfcheck" hidden></output></header><main>'
    )


def render_foot() -> str:
    """The page after the last card."""
    return f"</main><script>{_JS}</script></body></html>"


def render_html(cards: Sequence[Card], *, title: str, generated_at: float) -> str:
    """The whole page as one string (:func:`write_report` writes the same bytes piece by piece)."""
    head = render_head(cards, title=title, generated_at=generated_at)
    return head + "".join(render_card(c) for c in cards) + render_foot()


# -- the shell -------------------------------------------------------------------------------


def _thumb(
    directory: Path, card: Card, sha256: str | None, cache: _ThumbCache | None = None
) -> bytes | None:
    """A cached thumbnail, keyed by the file's hash so a new video gets a new one."""
    assert card.file is not None
    tag = (sha256 or f"{card.file_bytes}")[:12]
    name = card.id
    if len(name) > THUMB_ID_MAX_LEN:  # a made id may be 236 characters: too long with the tag
        name = f"{name[: THUMB_ID_MAX_LEN - 17]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    cached = directory / THUMBS_DIR / f"{name}-{tag}.jpg"
    with contextlib.suppress(OSError), os.fdopen(open_regular(cached), "rb") as f:
        return f.read()
    data = thumbnail_jpeg(directory / card.file)
    cache = cache or _ThumbCache()
    if data is not None and cache.usable:
        try:
            _cache_thumb(cached, data)
        except OSError as exc:  # a cache: the page shows the picture all the same
            cache.failed(cached, exc)
    return data


def _cache_thumb(cached: Path, data: bytes) -> None:
    if not _own_dir(cached.parent):  # never written through a planted link
        return
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=cached.parent)  # a short name, always
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, cached)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _own_dir(path: Path) -> bool:
    """The folder, made if missing, when it is one in the output folder itself, not a link."""
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    return stat.S_ISDIR(path.lstat().st_mode)


class _ThumbCache:
    """Whether thumbnails are still written to ``.thumbs``: a disk that refused one (full,
    read-only) refuses the next, so the first failure is said once and caching stops for
    this report; the report's worker threads share one."""

    def __init__(self) -> None:
        self.usable = True
        self._lock = threading.Lock()

    def failed(self, path: Path, exc: OSError) -> None:
        with self._lock:
            if not self.usable:
                return
            self.usable = False
        log.warning(
            "thumbnails not cached: cannot write %s: %s (the report shows them all the same)",
            path,
            exc.strerror or exc,
        )


_Plan = tuple[Card, JobState | None, Mapping[str, Any]]  # a card, its state and request
WINDOW = 64  # cards in the thread pool at once: the thumbnails held do not grow with jobs
_T = TypeVar("_T")
_R = TypeVar("_R")


def _checked(directory: Path, plan: _Plan) -> _Plan:
    """Add what needs the disk and the header counts: the file's presence, and for ledgers
    older than verification a probe and its flags."""
    card, state, req = plan
    if card.file is None:
        return plan
    if not is_regular(directory / card.file):  # a link, a FIFO: not a video to show or open
        return replace(card, file=None), state, req
    if card.video is None:
        probe = probe_video(directory / card.file)
        flags = compare(expected_video(card.model, req), probe) if req else []
        card = replace(card, video=probe, flags=tuple(flags))
    return card, state, req


def _with_thumb(directory: Path, cache: _ThumbCache, plan: _Plan) -> Card:
    """The card with its picture: the decoding, done in the pool, a window at a time."""
    card, state, _ = plan
    if card.file is None:
        return card
    return replace(card, thumb=_thumb(directory, card, state.sha256 if state else None, cache))


def _in_order(
    pool: ThreadPoolExecutor, fn: Callable[[_T], _R], items: Iterable[_T], window: int = WINDOW
) -> Generator[_R, None, None]:
    """``fn`` over ``items`` in the pool, the results in order, at most ``window`` of them
    in flight (a plain ``pool.map`` submits every item at once and keeps every result)."""
    pending: deque[Future[_R]] = deque()
    try:
        for item in items:
            if len(pending) >= window:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()
    finally:  # the consumer stopped (a failed write): start nothing more
        for fut in pending:
            fut.cancel()


def _plans(
    directory: Path, jobs: Iterable[Job], states: Mapping[str, JobState] | None
) -> list[_Plan]:
    """Every card from the ledger and results.json, in results.json order: no file opened."""
    states = load_states(directory) if states is None else states
    results = current_results(directory, states)
    from_manifest = {j.id: compact_request(j.request) for j in jobs}
    plans: list[_Plan] = []
    for row in results.get("jobs", []):
        jid = str(row.get("id"))
        state = states.get(jid)
        req = from_manifest.get(jid) or (state.request if state else None) or {}
        plans.append((card_for(row, state, req), state, req))
    return plans


def _checked_plans(
    pool: ThreadPoolExecutor,
    directory: Path,
    jobs: Iterable[Job],
    states: Mapping[str, JobState] | None,
) -> list[_Plan]:
    """Every card with what the header counts need from the disk (:func:`_checked`)."""
    return list(_in_order(pool, partial(_checked, directory), _plans(directory, jobs, states)))


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), "veobatch-report")


def build_cards(
    directory: Path,
    jobs: Iterable[Job] = (),
    states: Mapping[str, JobState] | None = None,
) -> list[Card]:
    """The cards of an output directory, in results.json order, thumbnails and all; ``jobs``
    (the manifest, when at hand) supplies requests the ledger lacks; ``states``, when the
    journal was just replayed. Holds every thumbnail: the report itself streams them."""
    cache = _ThumbCache()
    with _pool() as pool:
        plans = _checked_plans(pool, directory, jobs, states)
        return list(_in_order(pool, partial(_with_thumb, directory, cache), plans))


def write_report(
    directory: Path,
    jobs: Iterable[Job] = (),
    *,
    title: str | None = None,
    states: Mapping[str, JobState] | None = None,
) -> Path:
    """Write ``DIR/report.html`` atomically and return its path (blocking: use a thread).

    The header first (from the cards' small fields), then each card as soon as its thumbnail
    is made, in order: only a window of thumbnails is ever in memory, whatever the jobs."""
    cache = _ThumbCache()
    name = title or f"veobatch report: {directory.resolve().name}"
    path = directory / REPORT_NAME
    with _pool() as pool:
        plans = _checked_plans(pool, directory, jobs, states)
        head = render_head([c for c, _, _ in plans], title=name, generated_at=time.time())
        try:
            # Readable as the umask says, like the videos and results.json: it holds the
            # prompts and a frame of every video.
            cards = _in_order(pool, partial(_with_thumb, directory, cache), plans)
            with atomic_writer(path) as f, contextlib.closing(cards):
                f.write(head.encode("utf-8", "replace"))
                for card in cards:
                    f.write(render_card(card).encode("utf-8", "replace"))
                f.write(render_foot().encode("utf-8", "replace"))
        except OSError as exc:
            if exc.filename is None:  # a failed write or fsync names no file: say which
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise
    return path
