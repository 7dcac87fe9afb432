"""Event handlers of the app: plain typed functions over envlf, which the tests call directly.

No tensor work here: searching, attention maps and overlays are envlf calls
(envlf.search.engine, envlf.explain.gradcam through the engine, envlf.explain.viz). Results travel between events
as plain dicts in ``gr.State`` (``ResultState``), so every handler is a function of its
arguments and the backend.

Every handler turns bad input into a ``gr.Error`` with a readable message (never a stack
trace): empty / overlong queries, unreadable or oversized uploads, unknown ids, a result
that was not selected, a grade that contradicts the label. Unexpected failures are logged
on the server and reported as one line.

This module deliberately has no ``from __future__ import annotations``: Gradio reads the
``gr.Request`` / ``gr.OAuthProfile`` / ``gr.SelectData`` hints at run time to inject them.
"""

import functools
import html
import logging
import os
import tempfile
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from envlf import __version__
from envlf.explain import viz
from envlf.model.checkpoint import CheckpointError
from envlf.data.datasets import ImageLoadError, load_image
from envlf.feedback.store import read_feedback, snapshot, summary
from envlf.search.engine import QueryError, clean_query

from . import plots
from . import validate as V

log = logging.getLogger("envlf.app")

APP_VERSION = f"envlf-app/{__version__}"
MAX_K = 100  # most results one search returns
MAX_RERANK_K = 128  # most candidates the fusion encoder re-scores per query
DISPLAY_MAX_SIDE = 1024  # uploads are kept and shown at most this big (the model sees 256 px anyway)
ATTENTION_CACHE = 64  # attention maps kept (per (image, text)), so switching words is instant
UPLOAD_CACHE = 32  # uploaded query images kept (display size), keyed by their sha256
GRADES = [("no grade", "none"), ("0 · not relevant", "0"), ("1 · marginal", "1"), ("2 · relevant", "2"),
          ("3 · highly relevant", "3")]
SENTENCE = viz.SENTENCE

T2I_COLUMNS = ["#", "image", "class", "ITC cos", "ITM p", "ITC rank"]
I2T_COLUMNS = ["#", "caption", "copies", "images", "ITC cos", "ITM p", "ITC rank"]
# the caption column takes the room; short headers never wrap a letter per line
I2T_WIDTHS = ["6%", "46%", "10%", "10%", "10%", "9%", "9%"]

ResultState = dict  # {"direction", "query_text", "query_image_id", "query_image_sha256", "items", ...}


# -- errors ---------------------------------------------------------------------------------

def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def user_message(e: BaseException) -> str:
    """One readable line for an expected error."""
    if isinstance(e, KeyError) and e.args:
        return _one_line(e.args[0])
    return _one_line(str(e)) or type(e).__name__


def fail(message: str) -> gr.Error:
    """A gr.Error for the user. Gradio shows the message as (sanitised) HTML, so it is escaped:
    a query or file name with markup in it reads as text."""
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def readable_errors(fn: Callable) -> Callable:
    """Expected errors (bad input) -> gr.Error with their message; anything else is logged
    with its traceback on the server and shown to the user as one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (QueryError, ImageLoadError, CheckpointError, KeyError, ValueError) as e:
            raise fail(user_message(e)) from None
        except Exception as e:  # noqa: BLE001 - the user sees one line, the log the traceback
            log.exception("unexpected error in %s", fn.__name__)
            raise fail(f"Unexpected error ({type(e).__name__}); the server log has the details.") from None

    return wrapper


def _quote(text: Any, limit: int = 60) -> str:
    """A user-supplied value, shortened and quoted, for a message."""
    s = _one_line(str(text), limit)
    return repr(s)


# -- small pieces ---------------------------------------------------------------------------

def _clamp_int(value: Any, lo: int, hi: int, name: str) -> int:
    try:
        return V.as_int(value, name, lo, hi)
    except ValueError as e:
        raise fail(str(e)) from None


def _flag(value: Any, name: str) -> bool:
    try:
        return V.as_bool(value, name)
    except ValueError as e:
        raise fail(str(e)) from None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def gallery_caption(hit: dict) -> str:
    """"#rank · ITM p · ITC cos · class" for a result tile."""
    parts = [f"#{hit['rank']}"]
    if hit.get("itm") is not None:
        parts.append(f"ITM {hit['itm']:.2f}")
    parts.append(f"ITC {hit['itc']:.3f}")
    if hit.get("label"):
        parts.append(str(hit["label"]))
    return " · ".join(parts)


def results_table(items: list[dict]) -> pd.DataFrame:
    rows = [[h["rank"], h["image_id"], h.get("label") or "", round(h["itc"], 4),
             None if h.get("itm") is None else round(h["itm"], 4), h["itc_rank"]] for h in items]
    return pd.DataFrame(rows, columns=T2I_COLUMNS)


def captions_table(items: list[dict]) -> pd.DataFrame:
    rows = [[h["rank"], h["text"], h["count"], h["n_images"], round(h["itc"], 4),
             None if h.get("itm") is None else round(h["itm"], 4), h["itc_rank"]] for h in items]
    return pd.DataFrame(rows, columns=I2T_COLUMNS)


def status_line(result, what: str) -> str:
    """Markdown: timings and the model / index that produced the results. No user text in it."""
    t = result.timings_ms
    parts = [f"**{len(result.items)} {what}**", f"encode {t.get('encode_query', 0):.1f} ms",
             f"ANN {t.get('ann', 0):.1f} ms"]
    if "rerank" in t:
        parts.append(f"re-rank {t['rerank']:.1f} ms ({result.reranked} candidates)")
    parts += [f"total {t.get('total', 0):.1f} ms", f"model `{result.model_fingerprint}`",
              f"index `{result.index_fingerprint}`"]
    return " · ".join(parts)


def parse_grade(grade: Any) -> int | None:
    """A graded judgement 0-3, or None for no grade ("", "none", "no grade")."""
    if grade is None or (isinstance(grade, str) and grade.strip().lower() in ("", "none", "no grade")):
        return None
    try:
        return V.as_int(grade, "Grade", 0, 3, clamp=False)
    except ValueError:
        raise fail(f"Grade must be 0-3 or none, not {_quote(grade)}.") from None


def new_result_id() -> str:
    """Names one list of results, so a selection made in it is never applied to the next one."""
    return uuid.uuid4().hex[:12]


def new_session_id() -> str:
    return "anon-" + uuid.uuid4().hex[:12]


def resolve_annotator(session_id: str | None, request: Any = None, profile: Any = None) -> str:
    """Spaces login name (OAuth profile, or the request's user) when there is one, else the
    per-session anonymous id (a new one when the session has none yet)."""
    if profile is not None:
        name = getattr(profile, "username", None) or (profile.get("preferred_username") if hasattr(profile, "get")
                                                      else None)
        if name:
            return str(name)
    user = getattr(request, "username", None) if request is not None else None
    if user:
        return str(user)
    return session_id or new_session_id()


def display_copy(image: Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> Image.Image:
    """The image itself when small enough, else a copy whose longer side is max_side."""
    if max(image.size) <= max_side:
        return image
    out = image.copy()
    out.thumbnail((max_side, max_side), Image.BILINEAR)
    return out


def _upload_path(image: Any) -> str | None:
    """Path of an upload as Gradio hands it over: a path, or its FileData dict (preprocess off)."""
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, dict):
        return image.get("path")
    return getattr(image, "path", None)


def _query_vector(result, engine, **query) -> np.ndarray:
    """The query's ITC embedding for the embedding map: the one the search used when the
    result carries it (no second pass through an encoder), else computed (envlf.explain.viz)."""
    vec = getattr(result, "query_embedding", None)
    return vec if vec is not None else viz.query_embedding(engine, **query)


class T2IOutput(NamedTuple):
    gallery: list  # [(path, caption)]
    table: pd.DataFrame
    status: str
    scores_plot: Any
    map_plot: Any
    geo_plot: Any  # where the hits are (GeoTIFF galleries), else a figure that says there is no map
    state: ResultState


class I2TOutput(NamedTuple):
    table: pd.DataFrame
    status: str
    map_plot: Any
    state: ResultState


class Explanation(NamedTuple):
    image: Image.Image | None  # the tile / query image (display size)
    overlay: Image.Image | None  # the attention map over it, same size
    words: Any  # gr.Radio update: "whole sentence" + the words
    details: str  # plain text about the selected result


class FeedbackSummary(NamedTuple):
    counts: str
    timeline: Any
    precision: Any
    per_query: pd.DataFrame
    per_annotator: pd.DataFrame


# -- the handlers ---------------------------------------------------------------------------

# the before/after rows the Model tab shows for a fine-tuned model: (group, key, label)
FINETUNE_ROWS = (
    ("holdout", "itm_auc", "held-out labelled queries: ITM AUC (relevant above not relevant)"),
    ("holdout", "itm_p@1", "held-out labelled queries: re-ranker's first pick relevant"),
    ("holdout", "itc_auc", "held-out labelled queries: ITC AUC"),
    ("eval", "ITC mR", "{split} split: ITC mR"),
    ("eval", "re-ranked", "{split} split: re-ranked mR"),
)


def finetune_table_markdown(entry: dict) -> str:
    """Markdown: a fine-tune lineage entry's before / after / change on the queries it held out
    (never trained on) and on its evaluation split, so a user sees whether the labels helped."""
    hyper = entry.get("hyperparameters", {}) or {}
    held = entry.get("judgements", {}).get("holdout", "?")
    split = html.escape(str(hyper.get("eval_split", "?")))
    rows = ["**Did the labels help?** The last fine-tune, before → after, on "
            f"{len(entry.get('holdout', {}).get('qids', []))} held-out queries ({held} judgements, never trained "
            f"on) and on the `{split}` split:", "",
            "| measure | before | after | change |", "|---|---:|---:|---:|"]
    for group, key, label in FINETUNE_ROWS:
        b, a = entry["before"].get(group, {}) or {}, entry["after"].get(group, {}) or {}
        if key == "re-ranked":
            key = next((k for k in b if k.startswith("re-ranked top") and k.endswith(" mR")), "")
        x, y = b.get(key), a.get(key)
        if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or x != x or y != y:
            continue
        rows.append(f"| {label.format(split=split)} | {x:.3f} | {y:.3f} | {y - x:+.3f} |")
    return "\n".join(rows)


class Handlers:
    """All event handlers over one backend (demo.backend.Backend), or over what a start-up
    (demo.startup.Startup) serves at the moment of each call."""

    def __init__(self, source):
        self.source = source
        self._attention: OrderedDict = OrderedDict()
        self._uploads: OrderedDict = OrderedDict()
        self._overviews: dict = {}  # scene path -> (overview RGB, WGS84 bounds), the map's background
        self._lock = threading.Lock()

    # what is served
    @property
    def backend(self):
        """The backend being served; gr.Error while the app is still getting ready."""
        if hasattr(self.source, "current"):
            from .startup import NotReady

            try:
                return self.source.current()
            except NotReady as e:
                raise fail(str(e)) from None
        return self.source

    @property
    def config(self):
        return self.source.config

    def ready(self) -> bool:
        return getattr(self.source, "backend", self.source) is not None

    def final(self) -> bool:
        return bool(getattr(self.source, "final", True)) and self.ready()

    def startup_markdown(self) -> str:
        """The line above the app: what the start-up is doing (empty once nothing more comes)."""
        if not hasattr(self.source, "snapshot"):
            return ""
        snap = self.source.snapshot()
        p = snap["progress"]
        pct = max(0.0, min(1.0, float(p.get("fraction") or 0)))
        bar = f"`{'█' * round(20 * pct)}{'░' * (20 - round(20 * pct))}`"
        head = html.escape(snap["headline"])
        if snap["state"] == "failed":
            return f"### Start-up failed\n{html.escape(snap['error'])}"
        if not snap["ready"]:
            return ("### Getting ready: building the embedded demo (first start)\n"
                    f"{bar} {head}\n\nThe search appears here by itself when the first model is ready; "
                    "no need to reload.") if self.config.checkpoint is None else \
                f"### Getting ready\n{bar} {head}\n\nThe search appears here by itself when it is ready."
        if not snap["final"]:
            about = html.escape(p.get("about") or "the next model")
            return (f"Serving a first, quickly trained model. Building the {about} in the background: "
                    f"{bar} {head}. It replaces this one by itself (then search again).")
        return ""

    def about_line(self) -> str:
        b = self.backend
        return (f"Gallery: **{len(b.index):,} images**, {len(b.index.corpus.strings):,} distinct captions · "
                f"model `{b.model_fingerprint}` ({b.model.config.name}) · index `{b.index_fingerprint}`"
                + (f" · {html.escape(b.source)}" if b.source else ""))

    def page_view(self, seen: int | None):
        """Timer / load: (status line, app column, gallery line, sample tiles, model tab, timer,
        version shown). What depends on the backend is sent only when a new one is served."""
        version = int(getattr(self.source, "version", 1) or 0)
        ready = self.ready()
        fresh = ready and version != seen
        if hasattr(self.source, "start"):
            self.source.start()  # reload mode / Spaces import: the first page view starts it
        return (self.startup_markdown(), gr.Column(visible=ready),
                self.about_line() if fresh else gr.skip(), self.sample_tiles(16) if fresh else gr.skip(),
                self.model_info() if fresh else gr.skip(),
                gr.Timer(active=not self.final() and getattr(self.source, "state", "") != "failed"),
                version if ready else seen)

    # shortcuts
    @property
    def engine(self):
        return self.backend.engine

    @property
    def index(self):
        return self.backend.engine.index

    def _in_gallery(self, image_id: str) -> bool:
        try:
            self.index.row_of(str(image_id))
            return True
        except KeyError:
            return False

    def _check_image_id(self, image_id: str) -> str:
        image_id = str(image_id).strip()
        try:
            self.index.row_of(image_id)
        except KeyError:
            raise fail(f"There is no image {_quote(image_id)} in this gallery.") from None
        return image_id

    def _limits(self, k: Any, rerank_k: Any) -> tuple[int, int]:
        return (_clamp_int(k, 1, min(MAX_K, len(self.index)), "k"),
                _clamp_int(rerank_k, 0, MAX_RERANK_K, "re-rank k"))

    def _remember(self, cache: OrderedDict, key, value, size: int):
        with self._lock:
            cache[key] = value
            cache.move_to_end(key)
            while len(cache) > size:
                cache.popitem(last=False)
        return value

    def _recall(self, cache: OrderedDict, key):
        with self._lock:
            value = cache.get(key)
            if value is not None:
                cache.move_to_end(key)
            return value

    def _attention_maps(self, key: str, text: str, image: Image.Image):
        """Attention maps of `text` on `image` (envlf.explain.gradcam), remembered per (image key, text)."""
        maps = self._recall(self._attention, (key, text))
        if maps is None:
            maps = self._remember(self._attention, (key, text), self.engine.attention(text, image=image),
                                  ATTENTION_CACHE)
        return maps

    def load_upload(self, image: Any) -> Image.Image:
        """An uploaded file (path / Gradio FileData dict / PIL image) -> RGB PIL image, through
        envlf.data.datasets.load_image with the app's pixel limit. Raises gr.Error with the reason."""
        if isinstance(image, Image.Image):
            src: Any = image
        else:
            src = _upload_path(image)
            if not src:
                raise fail("Upload an image or pick a tile from the gallery.")
        try:
            return load_image(src, max_pixels=self.backend.config.max_upload_pixels)
        except ImageLoadError as e:
            msg = str(e)
            if isinstance(src, str):  # the server's temp path (and the uploader's file name) stay private
                msg = msg.replace(src, "").lstrip(": ")
            raise fail(f"Cannot use this upload: {_one_line(msg)}") from None

    def _map_figure(self, query_vec, query_name: str, items: list[dict]):
        emap = self.backend.embedding_map()
        qxy = emap.project(query_vec)[0] if query_vec is not None else None
        hits = []
        rows = [h["row"] for h in items if "row" in h]
        if rows:
            xy = emap.project(np.asarray(self.index.embeddings[np.asarray(rows)], dtype=np.float32))
            hits = [(h["rank"], float(p[0]), float(p[1]), h["image_id"]) for h, p in zip(items, xy)]
        return plots.embedding_figure(emap.xy, emap.labels, emap.ids, emap.explained, emap.total, qxy,
                                      query_name, hits)

    def _bbox(self, text: Any) -> tuple[float, float, float, float] | None:
        """The search box "west, south, east, north" in degrees, or None when empty."""
        text = str(text or "").strip()
        if not text:
            return None
        try:
            box = tuple(float(v) for v in text.replace(";", ",").split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            raise fail(f"Bounding box: four numbers west, south, east, north (degrees), got {text[:80]!r}.")
        w, s_, e, n = box
        if not (-180 <= w < e <= 180 and -90 <= s_ < n <= 90):
            raise fail("Bounding box: needs -180 <= west < east <= 180 and -90 <= south < north <= 90.")
        if self.index.crs is None:
            raise fail("This gallery has no georeferenced chips (index GeoTIFF scenes for a map): clear the box.")
        return box

    def _geo_figure(self, items: list[dict], bbox=None):
        """The hits on the map of their scenes (GeoTIFF galleries), else a figure saying why not."""
        from envlf.data.geotiff import SceneError, scene_overview

        frame = self.index.geo_frame()
        if not len(frame):
            return plots.empty_figure("no map: this gallery holds no georeferenced chips "
                                      "(envlf index build --source <GeoTIFF scenes>)")
        scenes = []
        for path in frame["scene"].unique():
            if path not in self._overviews:
                try:
                    self._overviews[path] = scene_overview(path)
                except (SceneError, OSError) as e:  # the scene moved: footprints without a background
                    log.warning("map background of %s: %s", path, e)
                    self._overviews[path] = None
            if self._overviews[path] is not None:
                scenes.append(self._overviews[path])
        hits = [(h["rank"], h["geo"]["lonlat"], h["image_id"]) for h in items if h.get("geo")]
        return plots.geo_figure(scenes, frame[["west", "south", "east", "north"]].to_numpy(), hits, bbox,
                                tiles=self.config.basemap_tiles)

    # -- session ------------------------------------------------------------------------------
    def start_session(self, request: gr.Request = None, profile: Optional[gr.OAuthProfile] = None
                      ) -> tuple[str, str]:
        """On page load: the annotator name for this session and a line saying so."""
        who = resolve_annotator(None, request, profile)
        kind = "anonymous session id" if who.startswith("anon-") else "signed-in user"
        return who, f"Judgements are saved as **{html.escape(who)}** ({kind})."

    # -- text -> image ------------------------------------------------------------------------
    @readable_errors
    def text_to_image(self, query: str, k: float = 12, rerank: bool = True, rerank_k: float = 16,
                      bbox: str = "") -> T2IOutput:
        """Search the gallery with a text query: ITC nearest neighbours, fusion re-ranking;
        bbox "west, south, east, north" (WGS84 degrees): only chips centred inside it."""
        k, rerank_k = self._limits(k, rerank_k)
        box = self._bbox(bbox)
        res = self.engine.text_to_image(V.as_text(query, "Query"), k=k, rerank_k=rerank_k,
                                       rerank=_flag(rerank, "Re-rank"), bbox=box)
        items = res.as_dicts()
        state: ResultState = {"direction": "t2i", "query_text": res.query, "query_image_id": "",
                              "query_image_sha256": "", "items": items, "reranked": res.reranked, "result_id": new_result_id(),
                              "model_fingerprint": res.model_fingerprint, "index_fingerprint": res.index_fingerprint}
        qvec = _query_vector(res, self.engine, text=res.query)
        return T2IOutput(
            gallery=[(h["path"], gallery_caption(h)) for h in items],
            table=results_table(items),
            status=status_line(res, "images"),
            scores_plot=plots.scores_figure(items),
            map_plot=self._map_figure(qvec, f"query: {res.query}", items),
            geo_plot=self._geo_figure(items, box),
            state=state,
        )

    @readable_errors
    def more_like_this(self, state: ResultState | None, rank: Any, k: float = 12,
                       token: str | None = None) -> T2IOutput:
        """Image -> image (ITC): gallery images like the selected result."""
        hit = self.selected(state, rank, token)
        image_id = hit["image_id"]
        res = self.engine.image_to_image(image_id=image_id, k=_clamp_int(k, 1, min(MAX_K, len(self.index)), "k"))
        items = res.as_dicts()
        new_state: ResultState = {"direction": "i2i", "query_text": "", "query_image_id": image_id,
                                  "query_image_sha256": "", "items": items, "reranked": 0, "result_id": new_result_id(),
                                  "model_fingerprint": res.model_fingerprint,
                                  "index_fingerprint": res.index_fingerprint}
        qvec = _query_vector(res, self.engine, image_id=image_id)
        return T2IOutput(
            gallery=[(h["path"], gallery_caption(h)) for h in items],
            table=results_table(items),
            status=status_line(res, f"images like {html.escape(image_id)}"),
            scores_plot=plots.scores_figure(items),
            map_plot=self._map_figure(qvec, f"image {image_id}", items),
            geo_plot=self._geo_figure(items),
            state=new_state,
        )

    def selected(self, state: ResultState | None, rank: Any, token: str | None = None) -> dict:
        """The result at 1-based `rank` of the last search; gr.Error when there is none.

        token: the result_id of the list the selection was made in (the UI passes it; API
        callers may not): when newer results have replaced that list, the rank would point at
        a different item, so the selection is refused instead; so is a result of a gallery
        that is no longer served (the embedded default's next stage)."""
        served_index = self.backend.index_fingerprint if state and state.get("items") else ""
        if not state or not state.get("items"):
            raise fail("Search first, then select a result.")
        if token and token != state.get("result_id"):
            raise fail("The results changed after you selected this one: select a result again.")
        items = state["items"]
        if served_index and state.get("index_fingerprint") not in (None, "", served_index):
            # another index is served now (a model swap, the default's next stage): a result whose
            # image is not in it any more cannot be shown or judged
            gone = [h for h in items if h.get("image_id") and not self._in_gallery(h["image_id"])]
            if gone:
                raise fail("The app now serves another gallery than these results came from: search again.")
        try:
            r = V.as_rank(rank, len(items))
        except ValueError as e:
            raise fail(str(e)) from None
        return items[r - 1]

    @staticmethod
    def select_rank(state: ResultState | None, evt: gr.SelectData) -> tuple[int, str | None]:
        """Gallery / table selection -> (1-based rank (the row for a table), the result list's id)."""
        index = evt.index
        if isinstance(index, (list, tuple)):
            index = index[0]
        return int(index) + 1, (state or {}).get("result_id")

    @staticmethod
    def pick_rank(state: ResultState | None, pick: str) -> tuple[int, str | None]:
        """A click on the results map ("rank:time", written by demo.layout.GEO_CLICK_JS) ->
        (1-based rank, the result list's id), as a gallery selection gives."""
        head = str(pick or "").split(":", 1)[0].strip()
        if not head.isdigit() or int(head) < 1:
            raise gr.Error("Click a result's rank on the map to open it.")
        return int(head), (state or {}).get("result_id")

    def _explain(self, key: str, image: Image.Image, text: str, which: Any, details: str) -> Explanation:
        maps = self._attention_maps(key, text, image)
        try:
            w = viz.parse_choice(which)
        except KeyError:  # a word rather than its index (API callers)
            if which not in maps.words:
                raise KeyError(f"{_quote(which)} is neither 'sentence' nor a word of the caption "
                               f"({' '.join(maps.words)})") from None
            w = maps.words.index(which)
        if isinstance(w, int) and not 0 <= w < len(maps.words):
            raise fail(f"There is no word #{w} in {_quote(text)}: give 0-{len(maps.words) - 1} or 'sentence'.")
        shown = display_copy(image)
        overlay = viz.attention_overlay(shown, maps, w)
        words = gr.Radio(choices=viz.word_choices(maps), value=SENTENCE if w == SENTENCE else str(w))
        details += f"\nITM P(match) of the pair: {maps.itm_probability:.3f}"
        if viz.map_peak(maps, w) <= 0:
            details += "\n(this map is empty: no positive evidence for the match anywhere in the image)"
        return Explanation(shown, overlay, words, details)

    @readable_errors
    def explain_t2i(self, state: ResultState | None, rank: Any, which: Any = SENTENCE,
                    token: str | None = None) -> Explanation:
        """The selected result's tile and the attention map of the query (a word or the whole
        sentence) over it."""
        hit = self.selected(state, rank, token)
        tile = self.engine.gallery_image(hit["image_id"])
        details = (f"#{hit['rank']} · image {hit['image_id']}" + (f" · {hit['label']}" if hit.get("label") else "")
                   + f"\nITC {_fmt(hit['itc'])} (ITC rank #{hit['itc_rank']}) · ITM {_fmt(hit.get('itm'))}"
                   + "".join(f"\n– {c}" for c in hit.get("captions", [])[:5]))
        if state["direction"] != "t2i":
            return Explanation(display_copy(tile), None, gr.Radio(choices=[("whole sentence", SENTENCE)],
                                                                  value=SENTENCE),
                               details + "\n(attention maps explain text matches; this is an image→image result)")
        return self._explain(f"id:{hit['image_id']}", tile, state["query_text"], which, details)

    # -- image -> text ------------------------------------------------------------------------
    @readable_errors
    def image_to_text(self, image: Any = None, image_id: str | None = "", k: float = 10, rerank: bool = True,
                      rerank_k: float = 16) -> I2TOutput:
        """Captions for an uploaded image, or for a gallery tile when image_id is given."""
        k, rerank_k = self._limits(k, rerank_k)
        image_id = V.as_text(image_id, "Image id").strip()
        if image_id:
            image_id = self._check_image_id(image_id)
            res = self.engine.image_to_text(image_id=image_id, k=k, rerank_k=rerank_k, rerank=_flag(rerank, "Re-rank"))
            sha, qvec = "", _query_vector(res, self.engine, image_id=image_id)
            name = f"image {image_id}"
        else:
            pil = self.load_upload(image)
            res = self.engine.image_to_text(image=pil, k=k, rerank_k=rerank_k, rerank=_flag(rerank, "Re-rank"))
            sha = res.query.removeprefix("image:sha256:")
            self._remember(self._uploads, sha, display_copy(pil), UPLOAD_CACHE)
            qvec = _query_vector(res, self.engine, image=pil)
            name = "uploaded image"
        items = res.as_dicts()
        state: ResultState = {"direction": "i2t", "query_text": "", "query_image_id": image_id,
                              "query_image_sha256": sha, "query_path": "" if image_id else (_upload_path(image) or ""),
                              "items": items, "reranked": res.reranked, "result_id": new_result_id(),
                              "model_fingerprint": res.model_fingerprint, "index_fingerprint": res.index_fingerprint}
        return I2TOutput(captions_table(items), status_line(res, "captions"), self._map_figure(qvec, name, []), state)

    def _query_image(self, state: ResultState) -> tuple[str, Image.Image]:
        if state.get("query_image_id"):
            return f"id:{state['query_image_id']}", self.engine.gallery_image(state["query_image_id"])
        sha = state.get("query_image_sha256", "")
        image = self._recall(self._uploads, sha)
        if image is None and state.get("query_path"):
            image = self._remember(self._uploads, sha, display_copy(self.load_upload(state["query_path"])),
                                   UPLOAD_CACHE)
        if image is None:
            raise fail("The uploaded image is no longer available; upload it again.")
        return f"sha:{sha}", image

    @readable_errors
    def explain_i2t(self, state: ResultState | None, rank: Any, which: Any = SENTENCE,
                    token: str | None = None) -> Explanation:
        """Where in the query image the selected caption (a word or all of it) matched."""
        hit = self.selected(state, rank, token)
        key, image = self._query_image(state)
        details = (f"#{hit['rank']} · caption {hit['caption_id']} · {hit['count']}× in the corpus, "
                   f"{hit['n_images']} gallery image(s)\nITC {_fmt(hit['itc'])} (ITC rank #{hit['itc_rank']}) · "
                   f"ITM {_fmt(hit.get('itm'))}\n{hit['text']}")
        return self._explain(key, image, hit["text"], which, details)

    def sample_tiles(self, n: int = 24) -> list[tuple[str, str]]:
        """Up to n gallery tiles to pick a query from, classes taken in turn: (path, "id · class")."""
        meta = self.index.metadata
        by_label: dict[str, list[int]] = {}
        for i, lab in enumerate(meta["label"].tolist()):
            by_label.setdefault(lab or "", []).append(i)
        order: list[int] = []
        queues = [list(v) for _, v in sorted(by_label.items())]
        while len(order) < n and any(queues):
            for q in queues:
                if q and len(order) < n:
                    order.append(q.pop(0))
        self._sample_ids = [str(meta.iloc[i]["image_id"]) for i in order]
        return [(str(meta.iloc[i]["path"]),
                 f"{meta.iloc[i]['image_id']}" + (f" · {meta.iloc[i]['label']}" if meta.iloc[i]["label"] else ""))
                for i in order]

    def pick_tile(self, evt: gr.SelectData) -> tuple[str, str]:
        """A sample tile was clicked: its image id and its file (shown as the query image)."""
        ids = getattr(self, "_sample_ids", None) or []
        i = evt.index if not isinstance(evt.index, (list, tuple)) else evt.index[0]
        if not 0 <= int(i) < len(ids):
            raise fail("Unknown tile.")
        image_id = ids[int(i)]
        return image_id, str(self.index.metadata.iloc[self.index.row_of(image_id)]["path"])

    @readable_errors
    def use_t2i_selection(self, state: ResultState | None, rank: Any, token: str | None = None) -> tuple[str, str]:
        """The selected text->image result becomes the image query."""
        hit = self.selected(state, rank, token)
        return hit["image_id"], hit["path"]

    # -- feedback -----------------------------------------------------------------------------
    @readable_errors
    def record_feedback(self, state: ResultState | None, rank: Any, label: str, grade: Any = None,
                        annotator: str | None = None, request: Any = None, profile: Any = None,
                        token: str | None = None) -> tuple[str, str]:
        """Append one judgement of the selected result to the feedback CSV (envlf.feedback.store).
        Returns (a confirmation line, the annotator id of this session)."""
        if label not in ("relevant", "not_relevant"):
            raise fail(f"Label must be relevant or not_relevant, not {_quote(label)}.")
        hit = self.selected(state, rank, token)
        g = parse_grade(grade)
        if g is not None and (g > 0) != (label == "relevant"):
            raise fail(f"Grade {g} means {'relevant' if g > 0 else 'not relevant'}: pick "
                       f"{'1-3' if label == 'relevant' else '0'} or no grade for '{label.replace('_', ' ')}'.")
        who = resolve_annotator(annotator, request, profile)
        direction = state["direction"]
        if direction == "i2t":
            item_id, item_text = str(hit["caption_id"]), hit["text"]
        else:
            # <dataset>:<relative path>, not the server's absolute path: the CSV is shared
            item_id, item_text = hit["image_id"], self.index.item_ref(self.index.row_of(hit["image_id"]))
        place = None if direction == "i2t" else self.index.record(self.index.row_of(item_id))["geo"]
        row = {
            "annotator": who, "direction": direction,
            "query_text": state.get("query_text", "") if direction == "t2i" else "",
            "query_image_id": state.get("query_image_id", ""),
            "query_image_sha256": state.get("query_image_sha256", ""),
            "item_id": item_id, "item_text": item_text, "rank": int(hit["rank"]),
            "itc_score": float(hit["itc"]), "itm_score": None if hit.get("itm") is None else float(hit["itm"]),
            "label": label, "grade": g,
            "model_fingerprint": state.get("model_fingerprint", ""),
            "index_fingerprint": state.get("index_fingerprint", ""), "app_version": APP_VERSION,
            "lon": None if place is None else float(place["lon"]), "lat": None if place is None else float(place["lat"]),
        }
        self.backend.store.append(row)
        what = f"caption {item_id}" if direction == "i2t" else f"image {item_id}"
        return (f"Saved: result #{hit['rank']} ({what}) marked {label.replace('_', ' ')}"
                + (f", grade {g}" if g is not None else "") + f" by {who}."), who

    # -- label suggestions ("label these next") ----------------------------------------------------
    @readable_errors
    def suggest_next(self, state: ResultState | None, n: float = 8) -> pd.DataFrame:
        """The results of the last search whose judgement would teach the model most
        (envlf.feedback.suggest: ITM unsure, or ITC and ITM disagree), minus those already judged."""
        from envlf.search.engine import CaptionHit, ImageHit, SearchResult
        from envlf.feedback.suggest import judged_pairs, suggest

        if not state or not state.get("items"):
            raise fail("Search first: suggestions come from the re-ranked results of a search.")
        if state["direction"] not in ("t2i", "i2t"):
            raise fail("Suggestions need re-ranked results (text→image or image→text), not image→image.")
        if not state.get("reranked"):
            raise fail("Turn re-ranking on: suggestions weigh the fusion encoder's scores against ITC.")
        hit_type = ImageHit if state["direction"] == "t2i" else CaptionHit
        query = state["query_text"] if state["direction"] == "t2i" else (
            f"image:{state['query_image_id']}" if state.get("query_image_id")
            else f"image:sha256:{state.get('query_image_sha256', '')}")
        result = SearchResult(state["direction"], query, [hit_type(**h) for h in state["items"]],
                              int(state["reranked"]), state.get("model_fingerprint", ""),
                              state.get("index_fingerprint", ""))
        df, _ = self._read()
        exclude = judged_pairs(df) if len(df) else set()
        found = suggest(self.engine, [result], n=_clamp_int(n, 1, MAX_K, "n"), direction=state["direction"],
                        exclude=exclude)
        rows = [{"#": s.hit.rank,
                 "result": s.hit.image_id if state["direction"] == "t2i" else _one_line(s.hit.text, 80),
                 "score": round(s.score, 3), "why": s.reason} for s in found]
        return pd.DataFrame(rows, columns=["#", "result", "score", "why"])

    @staticmethod
    def select_suggestion(state: ResultState | None, evt: gr.SelectData) -> tuple[int, str | None]:
        """A row of the suggestions table -> (the result's rank, the result list's id)."""
        row = evt.row_value if isinstance(evt.row_value, (list, tuple)) else None
        if not row:
            raise fail("Select a suggestion row.")
        return int(row[0]), (state or {}).get("result_id")

    # -- model versions -----------------------------------------------------------------------
    def model_info(self) -> str:
        """Markdown: the model being served, where it came from (its lineage), and the index."""
        b = self.backend
        cfg = b.model.config
        lines = [f"**Serving model `{b.model_fingerprint}`** ({html.escape(cfg.name)}) from "
                 f"`{html.escape(str(b.checkpoint))}` · index `{b.index_fingerprint}` "
                 f"({len(self.index)} images, {len(self.index.corpus.strings)} captions).",
                 "", "Every result and every saved judgement carries the model fingerprint that produced it.",
                 "", "**Lineage** (oldest first):"]
        for e in b.lineage() or [{"event": "(none recorded)"}]:
            parts = [f"`{html.escape(str(e.get('event', '?')))}`"]
            if e.get("data"):
                parts.append(f"data {html.escape(str(e['data']))}")
            if isinstance(e.get("parent"), dict):
                parts.append(f"parent `{html.escape(str(e['parent'].get('fingerprint', '?')))}`")
            if e.get("feedback"):
                parts.append(f"{len(e['feedback'])} feedback file(s), "
                             f"{sum(int(f.get('used', 0) or 0) for f in e['feedback'])} judgements used")
            when = e.get("finished") or e.get("started")
            if when:
                parts.append(html.escape(str(when)))
            lines.append("- " + " · ".join(parts))
        tuned = [e for e in b.lineage() if e.get("event") == "finetune" and e.get("before") and e.get("after")]
        if tuned:
            lines += ["", finetune_table_markdown(tuned[-1])]
        return "\n".join(lines)

    @readable_errors
    def load_model(self, spec: str, progress=gr.Progress(track_tqdm=True)) -> str:
        """Serve another checkpoint without restarting (re-indexing the gallery when needed)."""
        from .backend import BackendError

        if not self.backend.config.allow_model_reload:
            raise fail("Loading another model is turned off on this server (ENVLF_MODEL_RELOAD=on enables it).")
        try:
            message = self.backend.swap_model(str(spec or ""), progress=lambda f, m: progress(f, desc=m))
        except BackendError as e:
            raise fail(str(e)) from None
        with self._lock:
            self._attention.clear()  # maps of the old model
        return f"{html.escape(message)}\n\n" + self.model_info()

    # -- feedback view ------------------------------------------------------------------------
    def _read(self):
        path = Path(self.backend.store.path)
        if not path.exists():
            from envlf.feedback.store import empty_frame

            return empty_frame(), None
        return read_feedback(path)

    @readable_errors
    def feedback_summary(self) -> FeedbackSummary:
        """Counts, labels over time, precision as judged, per query and per annotator."""
        df, report = self._read()
        s = summary(df)
        n_rel, n_not = int(s["per_label"]["relevant"]), int(s["per_label"]["not_relevant"])
        def n(count: int, one: str, many: str) -> str:
            return f"{count} {one if count == 1 else many}"

        counts = (f"**{n(s['total'], 'judgement', 'judgements')}** · relevant {n_rel} · not relevant {n_not} · "
                  f"{n(len(s['per_query']), 'query', 'queries')} · "
                  f"{n(len(s['per_annotator']), 'annotator', 'annotators')}")
        if report is not None and report.skipped:
            counts += f" · {len(report.skipped)} unreadable line(s) skipped"
        pq = s["per_query"].reset_index()
        cols = ["direction", "query", "relevant", "not_relevant", "total"]
        cols += [c for c in pq.columns if c.startswith("p@")]
        pq = pq[cols].round(3) if len(pq) else pd.DataFrame(columns=cols)
        pa = s["per_annotator"].reset_index() if len(s["per_annotator"]) else \
            pd.DataFrame(columns=["annotator", "relevant", "not_relevant", "total"])
        return FeedbackSummary(counts, plots.feedback_timeline_figure(s["per_hour"], s["per_day"]),
                               plots.precision_figure(s["precision_at_k"], s["judged_at_k"]), pq, pa)

    @readable_errors
    def export_feedback(self) -> list[str]:
        """The feedback CSV (a consistent snapshot) plus TREC qrels, queries and JSONL
        (envlf.feedback.exports), written to a new temporary folder; returns their paths."""
        from envlf.feedback.exports import to_jsonl, to_qrels

        path = Path(self.backend.store.path)
        if not path.exists():
            raise fail("No judgements yet: mark some results relevant or not relevant first.")
        out = Path(tempfile.mkdtemp(prefix="envlf-labels-"))
        csv_copy = out / "feedback.csv"
        csv_copy.write_bytes(snapshot(path))
        df, _ = read_feedback(csv_copy)
        to_qrels(df, out / "feedback.qrels", out / "feedback.queries.tsv")
        to_jsonl(df, out / "feedback.jsonl")
        return [str(csv_copy), str(out / "feedback.qrels"), str(out / "feedback.queries.tsv"),
                str(out / "feedback.jsonl")]

    # -- API helper -----------------------------------------------------------------------------
    @readable_errors
    def attention(self, text: str, image_id: str, which: Any = SENTENCE) -> tuple[Image.Image, Image.Image]:
        """Attention map of any text on any gallery tile: (tile, overlay of the same size)."""
        text = clean_query(V.as_text(text, "Text"))
        image_id = self._check_image_id(V.as_text(image_id, "Image id"))
        tile = self.engine.gallery_image(image_id)
        ex = self._explain(f"id:{image_id}", tile, text, which, "")
        return ex.image, ex.overlay
