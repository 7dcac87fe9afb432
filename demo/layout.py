"""The Gradio Blocks of the app: three tabs wired to demo.handlers.

    demo = build_demo(Handlers(backend), examples)
    demo.launch(**launch_kwargs(backend))

API endpoints (``gradio_client.Client(url).predict(..., api_name=...)``; results live in the
session, so one client can search, then explain or judge a result of that search):

    /text_to_image      (query, k, rerank, rerank_k) -> gallery, table, status, scores plot, map plot
    /t2i_attention      (rank, which: "sentence", a word's index or the word) -> tile, overlay, word choices,
                        details
    /t2i_relevant, /t2i_not_relevant   (rank, grade) -> confirmation
    /more_like_this     (rank, k) -> the same outputs as /text_to_image, image -> image
    /image_to_text      (image, image_id, k, rerank, rerank_k) -> captions table, status, map plot
    /i2t_attention      (rank, which) -> query image, overlay, word choices, details
    /i2t_relevant, /i2t_not_relevant   (rank, grade) -> confirmation
    /attention          (text, image_id, which) -> tile, overlay
    /feedback_summary   () -> counts, timeline, precision, per-query and per-annotator tables
    /export_feedback    () -> CSV, qrels, queries, JSONL files
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Optional, Sequence

import gradio as gr

from . import plots
from .handlers import GRADES, I2T_WIDTHS, SENTENCE, Handlers

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CSS_PATH = ASSETS / "style.css"

# gr.Plot has no click event: on page load, watch the results map (#t2i-geo) and, on a click
# of a hit's rank marker, write "rank:time" into the hidden #t2i-geo-pick box and fire an input
# event, which Gradio takes as a change of its value (the time makes a second click on the same
# hit a change too). Its .change runs Handlers.pick_rank.
GEO_CLICK_JS = """() => {
  const hook = () => {
    for (const plot of document.querySelectorAll('#t2i-geo .js-plotly-plot')) {
      if (plot.dataset.envlfClick === '1' || typeof plot.on !== 'function') continue;
      plot.dataset.envlfClick = '1';
      plot.on('plotly_click', (ev) => {
        const pt = (ev.points || []).find((p) => p.customdata !== undefined && p.customdata !== null);
        const box = document.querySelector('#t2i-geo-pick textarea, #t2i-geo-pick input');
        if (!pt || !box) return;
        box.value = String(Array.isArray(pt.customdata) ? pt.customdata[0] : pt.customdata) + ':' + Date.now();
        box.dispatchEvent(new Event('input', {bubbles: true}));
      });
    }
  };
  new MutationObserver(hook).observe(document.body, {childList: true, subtree: true});
  hook();
}"""

INTRO = """\
# EnVLF · remote-sensing text–image retrieval
Search an aerial-image archive with words, or find the captions that fit a tile. The dual
encoder (ITC) finds candidates fast; the fusion encoder re-ranks the top ones (ITM) and shows
*where* in the tile each word matched. Mark results relevant or not: every judgement is one
row of a CSV that fine-tuning reads back.
"""


def load_examples(path: Path = ASSETS / "examples.json") -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(q) for q in data.get("text_to_image", [])]


def _feedback_fn(handlers: Handlers, label: str):
    """A judgement handler with the label fixed (one per button); Gradio injects the request
    and the OAuth profile from the type hints."""

    def judge(state: dict, rank: float, grade: str, annotator: str, token: str, request: gr.Request,
              profile: Optional[gr.OAuthProfile] = None):
        message, who = handlers.record_feedback(state, rank, label, grade, annotator, request, profile, token)
        gr.Info(html.escape(message, quote=False), duration=3)  # toasts render HTML
        return message, who

    judge.__name__ = f"mark_{label}"
    return judge


def _session_fn(handlers: Handlers):
    def start(request: gr.Request, profile: Optional[gr.OAuthProfile] = None):
        return handlers.start_session(request, profile)

    return start


def _result_detail(prefix: str):
    """The panel under the results: selected rank, the image, its attention map, word choice,
    details, relevance buttons."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=220):
            rank = gr.Number(label="Selected result #", precision=0, interactive=False, elem_id=f"{prefix}-rank")
            words = gr.Radio(choices=[("whole sentence", SENTENCE)], value=SENTENCE, label="Attention map of",
                             info="the patches whose image tokens raise the ITM match (HiResCAM); a word: "
                                  "its share, what the fusion encoder read there through that word",
                             elem_id=f"{prefix}-words")
            details = gr.Textbox(label="Details", lines=6, max_lines=12, interactive=False,
                                 elem_id=f"{prefix}-details")
        image = gr.Image(label="Image", type="pil", format="png", interactive=False, height=300,
                         elem_id=f"{prefix}-image", buttons=["download", "fullscreen"])
        overlay = gr.Image(label="Attention map (HiResCAM)", type="pil",
                           format="png", interactive=False, height=300, elem_id=f"{prefix}-overlay",
                           buttons=["download", "fullscreen"])
    with gr.Row(equal_height=False):
        grade = gr.Radio(choices=GRADES, value="none", label="Grade (optional)", scale=3, elem_id=f"{prefix}-grade")
        with gr.Column(scale=1, min_width=200):
            relevant = gr.Button("✓ Relevant", variant="primary", size="md", elem_id=f"{prefix}-relevant")
            not_relevant = gr.Button("✗ Not relevant", variant="stop", size="md", elem_id=f"{prefix}-not-relevant")
    saved = gr.Textbox(label="Feedback", interactive=False, lines=1, elem_id=f"{prefix}-saved")
    with gr.Accordion("Label these next (where a judgement teaches the model most)", open=False):
        suggest = gr.Button("Suggest from these results", size="sm", elem_id=f"{prefix}-suggest")
        suggestions = gr.Dataframe(label="Click a row to select that result, then judge it", interactive=False,
                                   wrap=True, elem_id=f"{prefix}-suggestions")
    token = gr.State(None)  # result_id of the list the selection was made in (see Handlers.selected)
    return dict(rank=rank, words=words, details=details, image=image, overlay=overlay, grade=grade,
                relevant=relevant, not_relevant=not_relevant, saved=saved, token=token, suggest=suggest,
                suggestions=suggestions)


def _t2i_tab(examples: list[str]) -> dict:
    """The text -> image tab's components (inside its gr.Tab)."""
    t2i_state = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            query = gr.Textbox(label="Describe what to find", lines=1, max_lines=3,
                               placeholder="e.g. storage tanks beside a harbour", elem_id="t2i-query")
            if examples:
                gr.Examples(examples=[[q] for q in examples], inputs=[query], label="Example queries",
                            examples_per_page=12)
        with gr.Column(scale=1, min_width=220):
            k = gr.Slider(1, 50, value=12, step=1, label="k (results)")
            rerank = gr.Checkbox(value=True, label="Re-rank with the fusion encoder (ITM)")
            rerank_k = gr.Slider(0, 64, value=16, step=1, label="re-rank the top … candidates")
            search = gr.Button("Search", variant="primary", elem_id="t2i-search")
    t2i_status = gr.Markdown("", elem_id="t2i-status")
    gallery = gr.Gallery(label="Results (#rank · ITM p · ITC cos · class)", columns=6, height=420,
                         object_fit="cover", allow_preview=False, elem_id="t2i-gallery")
    t2i = _result_detail("t2i")
    more = gr.Button("More like this (image → image)", size="sm", elem_id="t2i-more")
    with gr.Accordion("Scores and embedding map", open=True):
        scores_plot = gr.Plot(plots.empty_figure("search to see the scores of the results"),
                              label="ITC vs ITM per result", show_label=False, elem_id="t2i-scores")
        t2i_map = gr.Plot(plots.empty_figure("search to place the query on the map"),
                          label="Gallery embedding map", show_label=False, elem_id="t2i-map")
        t2i_table = gr.Dataframe(label="Results", interactive=False, wrap=True, elem_id="t2i-table")
    with gr.Accordion("Where: the results on a map (GeoTIFF galleries)", open=False):
        bbox = gr.Textbox("", label="Only chips inside west, south, east, north (degrees; empty: everywhere)",
                          max_lines=1, placeholder="e.g. 15.0000, 45.1510, 15.0040, 45.1535", elem_id="t2i-bbox")
        geo_plot = gr.Plot(plots.empty_figure("search to see where the results are"), label="Map",
                           show_label=False, elem_id="t2i-geo")
        # a click on a footprint's rank writes "rank:time" here (GEO_CLICK_JS); gr.Plot has no click event
        geo_pick = gr.Textbox("", visible="hidden", elem_id="t2i-geo-pick")
    return dict(state=t2i_state, query=query, k=k, rerank=rerank, rerank_k=rerank_k, search=search,
                status=t2i_status, gallery=gallery, detail=t2i, more=more, scores=scores_plot, map=t2i_map,
                table=t2i_table, bbox=bbox, geo=geo_plot, geo_pick=geo_pick)


def _i2t_tab() -> dict:
    """The image -> text tab's components (inside its gr.Tab)."""
    i2t_state = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            query_image = gr.Image(label="Query image (upload, paste, or pick a tile below)",
                                   type="filepath", sources=["upload", "clipboard"], height=280,
                                   elem_id="i2t-image")
            image_id = gr.Textbox(label="…or a gallery image id", max_lines=1, elem_id="i2t-image-id")
        with gr.Column(scale=1, min_width=220):
            k2 = gr.Slider(1, 50, value=10, step=1, label="k (captions)")
            rerank2 = gr.Checkbox(value=True, label="Re-rank with the fusion encoder (ITM)")
            rerank_k2 = gr.Slider(0, 64, value=16, step=1, label="re-rank the top … candidates")
            search2 = gr.Button("Find captions", variant="primary", elem_id="i2t-search")
            use_sel = gr.Button("Use the selected text→image result", size="sm", elem_id="i2t-use")
    tiles = gr.Gallery(value=None, label="Pick a gallery tile", columns=8, height=320,
                       object_fit="cover", allow_preview=False, elem_id="i2t-tiles")
    i2t_status = gr.Markdown("", elem_id="i2t-status")
    i2t_table = gr.Dataframe(label="Captions (identical captions once: copies = occurrences in the "
                                   "corpus, images = tiles that carry it); click a row",
                             interactive=False, wrap=True, column_widths=I2T_WIDTHS,
                             elem_id="i2t-table")
    i2t = _result_detail("i2t")
    with gr.Accordion("Embedding map", open=False):
        i2t_map = gr.Plot(plots.empty_figure("find captions to place the image on the map"),
                          label="Gallery embedding map", show_label=False, elem_id="i2t-map")
    return dict(state=i2t_state, image=query_image, image_id=image_id, k=k2, rerank=rerank2, rerank_k=rerank_k2,
                search=search2, use_sel=use_sel, tiles=tiles, status=i2t_status, table=i2t_table, detail=i2t,
                map=i2t_map)


def _feedback_tab(cfg) -> dict:
    """The feedback tab's components (inside its gr.Tab)."""
    gr.Markdown(f"Judgements are appended to `{cfg.feedback.name}` on the server (one row each; the "
                "latest judgement of a (query, result) pair wins in the exports).")
    refresh = gr.Button("Refresh", variant="primary", elem_id="fb-refresh")
    counts = gr.Markdown("", elem_id="fb-counts")
    with gr.Row():
        timeline = gr.Plot(label="Labels over time", show_label=False, elem_id="fb-timeline")
        precision = gr.Plot(label="Precision as judged", show_label=False, elem_id="fb-precision")
    per_query = gr.Dataframe(label="Per query", interactive=False, wrap=True, elem_id="fb-per-query")
    per_annotator = gr.Dataframe(label="Per annotator", interactive=False, elem_id="fb-per-annotator")
    with gr.Row():
        export = gr.Button("Prepare downloads (CSV, TREC qrels, JSONL)", elem_id="fb-export")
        files = gr.File(label="Download labels", file_count="multiple", interactive=False,
                        elem_id="fb-files")
    return dict(refresh=refresh, counts=counts, timeline=timeline, precision=precision, per_query=per_query,
                per_annotator=per_annotator, export=export, files=files)


def _clear_detail():
    """New results: nothing selected, no map, no grade, the word list of the next selection,
    no suggestions (they belonged to the old results)."""
    return (None, None, None, "", "", gr.Radio(choices=[("whole sentence", SENTENCE)], value=SENTENCE),
            "none", None, None)


def _wire_detail(handlers: Handlers, annotator, tab: dict, state, explain, prefix: str, sources: list,
                 picks: Sequence = ()) -> list:
    """Select -> rank + token -> attention map; word choice -> map; the two judgement buttons.
    Returns the panel's components that _clear_detail resets."""
    shown = [tab["image"], tab["overlay"], tab["words"], tab["details"]]
    for source in sources:
        source.select(handlers.select_rank, [state], [tab["rank"], tab["token"]],
                      api_visibility="private").success(
            explain, [state, tab["rank"], gr.State(SENTENCE), tab["token"]], shown, api_visibility="private")
    for pick in picks:
        pick.change(handlers.pick_rank, [state, pick], [tab["rank"], tab["token"]], api_visibility="private",
                   show_progress="hidden").success(
            explain, [state, tab["rank"], gr.State(SENTENCE), tab["token"]], shown, api_visibility="private")
    tab["suggest"].click(handlers.suggest_next, [state], [tab["suggestions"]], api_name=f"{prefix}_suggest")
    tab["suggestions"].select(handlers.select_suggestion, [state], [tab["rank"], tab["token"]],
                              api_visibility="private").success(
        explain, [state, tab["rank"], gr.State(SENTENCE), tab["token"]], shown, api_visibility="private")
    tab["words"].input(explain, [state, tab["rank"], tab["words"], tab["token"]], shown, api_visibility="private")
    # The API takes any word of the caption (its index or the word itself): the Radio would
    # check `which` against the choices the UI showed last, which an API session never sees.
    with gr.Row(visible=False):
        api_rank, api_which, api_go = gr.Number(precision=0), gr.Textbox(value=SENTENCE), gr.Button()
    api_go.click(explain, [state, api_rank, api_which, gr.State(None)], shown, api_name=f"{prefix}_attention",
                 preprocess=False)
    for button, label in ((tab["relevant"], "relevant"), (tab["not_relevant"], "not_relevant")):
        button.click(_feedback_fn(handlers, label), [state, tab["rank"], tab["grade"], annotator, tab["token"]],
                     [tab["saved"], annotator], api_name=f"{prefix}_{label}", preprocess=False)
    return [tab["rank"], tab["image"], tab["overlay"], tab["details"], tab["saved"], tab["words"],
            tab["grade"], tab["token"], tab["suggestions"]]


# Every API event takes its arguments unprocessed (preprocess=False): a wrong type from a client
# reaches demo.validate, which answers with one clear line, instead of failing in a component's
# preprocess with a Gradio exception.

def _wire_t2i(handlers: Handlers, annotator, c: dict) -> None:
    """Text -> image. The selection panel is cleared *before* a search; a selection made in the
    old results while a search runs is caught by its token (Handlers.selected)."""
    outputs = [c["gallery"], c["table"], c["status"], c["scores"], c["map"], c["geo"], c["state"]]
    reset = _wire_detail(handlers, annotator, c["detail"], c["state"], handlers.explain_t2i, "t2i",
                         [c["gallery"], c["table"]], picks=[c["geo_pick"]])
    for trigger in (c["search"].click, c["query"].submit):
        trigger(_clear_detail, None, reset, api_visibility="private", queue=False).then(
            handlers.text_to_image, [c["query"], c["k"], c["rerank"], c["rerank_k"], c["bbox"]], outputs,
            api_name="text_to_image" if trigger == c["search"].click else False,
            api_visibility="public" if trigger == c["search"].click else "private", show_progress_on=[c["status"]],
            preprocess=False)
    more_rank = gr.Number(visible=False, precision=0)  # the selection, kept while the panel is cleared
    more_token = gr.State(None)
    c["more"].click(lambda r, t: (r, t), [c["detail"]["rank"], c["detail"]["token"]], [more_rank, more_token],
                    api_visibility="private", queue=False).then(
        _clear_detail, None, reset, api_visibility="private", queue=False).then(
        handlers.more_like_this, [c["state"], more_rank, c["k"], more_token], outputs, api_name="more_like_this",
        show_progress_on=[c["status"]], preprocess=False)


def _wire_i2t(handlers: Handlers, annotator, c: dict, t2i: dict) -> None:
    """Image -> text: the button, an upload, a picked tile, or the selected text -> image result."""
    inputs = [c["image"], c["image_id"], c["k"], c["rerank"], c["rerank_k"]]
    outputs = [c["table"], c["status"], c["map"], c["state"]]
    reset = _wire_detail(handlers, annotator, c["detail"], c["state"], handlers.explain_i2t, "i2t", [c["table"]])

    def clear_i2t():
        """A new upload: the previous image's captions must not stay beside it (the upload may fail)."""
        return "", None, "", None

    def then_search(event):
        # preprocess=False: the upload reaches the handler as a file, unopened, so envlf.data.datasets.load_image
        # (pixel limit, truncated files, non-images) gives the user the reason instead of a stack trace
        return event.success(_clear_detail, None, reset, api_visibility="private", queue=False).then(
            handlers.image_to_text, inputs, outputs, preprocess=False, api_visibility="private",
            show_progress_on=[c["status"]])

    c["search"].click(_clear_detail, None, reset, api_visibility="private", queue=False).then(
        handlers.image_to_text, inputs, outputs, api_name="image_to_text", preprocess=False,
        show_progress_on=[c["status"]])
    then_search(c["image"].upload(clear_i2t, None, [c["image_id"], c["table"], c["status"], c["state"]],
                                  api_visibility="private", queue=False))
    then_search(c["tiles"].select(handlers.pick_tile, None, [c["image_id"], c["image"]], api_visibility="private"))
    then_search(c["use_sel"].click(handlers.use_t2i_selection, [t2i["state"], t2i["detail"]["rank"],
                                                                t2i["detail"]["token"]],
                                   [c["image_id"], c["image"]], api_visibility="private"))


def _wire_attention_api(handlers: Handlers) -> None:
    """API only: the attention map of any text on any gallery tile."""
    with gr.Row(visible=False):
        api_text, api_id, api_which = gr.Textbox(), gr.Textbox(), gr.Textbox(value=SENTENCE)
        api_tile, api_overlay = gr.Image(type="pil", format="png"), gr.Image(type="pil", format="png")
        api_go = gr.Button()
    api_go.click(handlers.attention, [api_text, api_id, api_which], [api_tile, api_overlay], api_name="attention",
                 preprocess=False)


def build_demo(handlers: Handlers, examples: list[str] | None = None, title: str = "EnVLF retrieval") -> gr.Blocks:
    """The page. Nothing here needs the model: what depends on it (the gallery line, the
    sample tiles, the model tab) is filled in by `Handlers.page_view` on load and on the
    timer's ticks, so the page is served while the model is still being built."""
    cfg = handlers.config
    examples = load_examples() if examples is None else examples
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        annotator = gr.State(None)
        seen_version = gr.State(0)  # the backend version this page shows (Startup.version)
        gr.Markdown(INTRO)
        startup_md = gr.Markdown(handlers.startup_markdown(), elem_id="startup-status")
        with gr.Column(visible=handlers.ready(), elem_id="main") as main:
            with gr.Row():
                who = gr.Markdown("", elem_id="who")
                if cfg.use_login:
                    gr.LoginButton(size="sm", scale=0)
            about = gr.Markdown("", elem_id="about")
            with gr.Tabs():
                with gr.Tab("Text → image", id="t2i"):
                    t2i = _t2i_tab(examples)
                with gr.Tab("Image → text", id="i2t"):
                    i2t = _i2t_tab()
                with gr.Tab("Model", id="model") as model_tab:
                    model_md = gr.Markdown("", elem_id="model-info")
                    with gr.Row(visible=cfg.allow_model_reload):
                        new_ckpt = gr.Textbox(label="Serve another checkpoint (a directory, e.g. a fine-tuned "
                                                    "runs/…/model, or a hub id user/repo)", max_lines=1, scale=4,
                                              elem_id="model-path")
                        load = gr.Button("Load (re-indexes the gallery if needed)", scale=1, elem_id="model-load")
                with gr.Tab("Feedback", id="feedback") as feedback_tab:
                    fb = _feedback_tab(cfg)

        demo.load(_session_fn(handlers), None, [annotator, who], api_visibility="private")
        # the page follows the start-up (demo.startup): status line, then the app, then a better model
        timer = gr.Timer(2.0, active=not handlers.final())
        view = [startup_md, main, about, i2t["tiles"], model_md, timer, seen_version]
        demo.load(handlers.page_view, [seen_version], view, api_visibility="private")
        timer.tick(handlers.page_view, [seen_version], view, api_visibility="private", queue=False,
                   show_progress="hidden")
        _wire_t2i(handlers, annotator, t2i)
        _wire_i2t(handlers, annotator, i2t, t2i)
        load.click(handlers.load_model, [new_ckpt], [model_md], api_name="load_model", preprocess=False)
        model_tab.select(handlers.model_info, None, [model_md], api_visibility="private")
        summary_outputs = [fb["counts"], fb["timeline"], fb["precision"], fb["per_query"], fb["per_annotator"]]
        fb["refresh"].click(handlers.feedback_summary, None, summary_outputs, api_name="feedback_summary")
        feedback_tab.select(handlers.feedback_summary, None, summary_outputs, api_visibility="private")
        fb["export"].click(handlers.export_feedback, None, [fb["files"]], api_name="export_feedback")
        _wire_attention_api(handlers)
    return demo



def serve_images(demo: gr.Blocks, backend) -> None:
    """Gallery tiles are served from where they are (static paths, not copied into Gradio's
    cache per search). Called whenever a backend is served (the default's stages differ)."""
    dirs = [str(p) for p in backend.image_dirs]
    gr.set_static_paths(dirs)
    demo.allowed_paths = list(dict.fromkeys(list(getattr(demo, "allowed_paths", None) or []) + dirs))


def make_app(handlers) -> gr.Blocks:
    """The Blocks app.py serves. With a start-up in progress (demo.startup.Startup), each
    backend it serves registers its image folders when it comes."""
    demo = build_demo(handlers)
    source = handlers.source
    if hasattr(source, "on_backend"):
        source.on_backend = lambda b: serve_images(demo, b)
        if source.backend is not None:
            serve_images(demo, source.backend)
    else:  # a Backend
        gr.set_static_paths([str(p) for p in source.image_dirs])
    return demo


def close_app(demo: gr.Blocks) -> None:
    """demo.close() past a race in Gradio's own close: it sets the server's asyncio.Event from
    this thread while the server's loop may be adding waiters to it ("RuntimeError: deque mutated
    during iteration", seen once in `envlf bench load`). The server is closed all the same."""
    try:
        demo.close()
    except RuntimeError:
        if getattr(demo, "server", None) is not None:
            demo.server.close()


def launch(demo: gr.Blocks, source, **overrides):
    """Queue and launch with the app's settings (queue_kwargs, launch_kwargs + overrides)."""
    return demo.queue(**queue_kwargs()).launch(**launch_kwargs(source, **overrides))


def queue_kwargs() -> dict:
    """Arguments for demo.queue() (app.py and `envlf bench load` use the same).

    Each event has its own concurrency group by default, so this limit holds per endpoint:
    two searches, two attention maps, two caption searches ... may run at once."""
    return dict(default_concurrency_limit=2)


def blocked_paths_of(source) -> list[str]:
    """What the web server must never serve, even from inside a served folder: the feedback
    CSV (annotator names), the checkpoint and the index, and the app home's models, indexes,
    caches and build files. (Not the feedback file's folder: it may be /tmp, which holds
    Gradio's own upload cache.) `source`: a Backend or a Startup (known paths only)."""
    cfg = source.config
    paths = [cfg.feedback] + [cfg.home / d for d in ("models", "indexes", "cache")]
    paths += [cfg.home / n for n in ("build-status.json", "default.json", "build.log")]
    if getattr(source, "checkpoint", None) is not None:
        paths += [source.checkpoint, source.index_dir]
    else:
        if cfg.checkpoint and Path(cfg.checkpoint).expanduser().exists():
            paths.append(Path(cfg.checkpoint))
        if cfg.index is not None:
            paths.append(cfg.index)
    return list(dict.fromkeys(str(Path(p).expanduser().resolve()) for p in paths))


def launch_kwargs(source, **overrides) -> dict:
    """Arguments for demo.launch(): served paths limited to the gallery's image folders (those
    known now; a backend served later adds its own, see serve_images) and assets/, the
    blocked paths, an upload size limit, the theme and CSS (Gradio 6 takes them at launch)."""
    cfg = source.config
    dirs = [str(p) for p in getattr(source, "image_dirs", [])]
    kw = dict(server_name=cfg.host, server_port=cfg.port, share=cfg.share,
              allowed_paths=dirs + [str(ASSETS)],
              blocked_paths=blocked_paths_of(source),
              max_file_size=cfg.max_file_size, show_error=True, footer_links=["api"],
              theme=gr.themes.Soft(primary_hue="teal"), css_paths=[str(CSS_PATH)] if CSS_PATH.exists() else None,
              js=GEO_CLICK_JS)
    kw.update(overrides)
    return kw
