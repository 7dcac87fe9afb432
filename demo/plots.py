"""Plotly figures of the app: scores per result, the gallery's embedding map, the feedback so far.

Pure functions of plain data (dicts of results, numpy arrays, pandas tables): no model here.
Text that came from a user or a dataset (a query, image ids, class names) goes into figures
through hover/label *data*, never into templates, and escaped (`_text`): Plotly reads a
subset of HTML in labels (<a href>, <b>, <br>), so "<a href=...>" in a query would otherwise
become a link in the hover box.
"""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

# qualitative colours (Plotly's "D3" + "Dark24" sets, written out so the figure is the same
# with any plotly version)
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#2E91E5", "#E15F99", "#1CA71C", "#FB0D0D", "#DA16FF", "#222A2A", "#B68100", "#750D86",
           "#EB663B", "#511CFB", "#00A08B", "#FB00D1", "#FC0080", "#B2828D", "#6C7C32", "#778AAE", "#862A16",
           "#A777F1", "#620042", "#1616A7"]
MAX_CLASSES = len(PALETTE)  # more labels than this: the rest are drawn as "other"
UP, DOWN, SAME = "#2ca02c", "#d62728", "#7f7f7f"


def _text(value) -> str:
    """Any text for a Plotly label: its markup shown as characters (Plotly decodes entities)."""
    return html.escape(str(value), quote=False)


def _layout(fig: go.Figure, title: str, height: int = 380) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, font=dict(size=14)), height=height, template="plotly_white",
                      margin=dict(l=50, r=20, t=50, b=45), legend=dict(font=dict(size=10)))
    return fig


def empty_figure(message: str, height: int = 300) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=13, color="#666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", height)


def scores_figure(items: Sequence[dict]) -> go.Figure:
    """ITC cosine vs ITM P(match) per result (left) and how re-ranking moved each result from
    its ITC rank to its final rank (right). items: ImageHit / CaptionHit as dicts."""
    if not items:
        return empty_figure("no results")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.12,
                        subplot_titles=("ITC cosine vs ITM P(match)", "rank: ITC only → after re-ranking"))
    rr = [h for h in items if h.get("itm") is not None]
    rest = [h for h in items if h.get("itm") is None]

    def colour(h):
        move = h["itc_rank"] - h["rank"]
        return UP if move > 0 else DOWN if move < 0 else SAME

    def hover(h):
        name = _text(h.get("image_id") or f"caption {h.get('caption_id')}")
        return (f"#{h['rank']} (ITC rank #{h['itc_rank']})<br>{name}<br>ITC {h['itc']:.3f}"
                + (f"<br>ITM {h['itm']:.3f}" if h.get("itm") is not None else ""))

    if rr:
        fig.add_trace(go.Scatter(
            x=[h["itc"] for h in rr], y=[h["itm"] for h in rr], mode="markers+text",
            text=[f"#{h['rank']}" for h in rr], textposition="top center", textfont=dict(size=10),
            marker=dict(size=10, color=[colour(h) for h in rr], line=dict(width=1, color="#333")),
            hovertext=[hover(h) for h in rr], hoverinfo="text", name="re-ranked", showlegend=False), 1, 1)
        fig.update_yaxes(title_text="ITM P(match)", range=[-0.05, 1.08], row=1, col=1)
    else:
        fig.add_annotation(text="re-ranking off: no ITM scores", x=0.5, y=0.5, xref="x domain", yref="y domain",
                           showarrow=False, font=dict(color="#666"), row=1, col=1)
    if rest:  # not re-ranked: a rug along the bottom at their ITC
        fig.add_trace(go.Scatter(
            x=[h["itc"] for h in rest], y=[-0.02] * len(rest) if rr else [0.0] * len(rest), mode="markers",
            marker=dict(symbol="line-ns-open", size=12, color="#999"), hovertext=[hover(h) for h in rest],
            hoverinfo="text", name="ITC only", showlegend=False), 1, 1)
    fig.update_xaxes(title_text="ITC cosine", row=1, col=1)
    # slope chart: one line per result from its ITC rank to its final rank
    n = max(max(h["rank"], h["itc_rank"]) for h in items)
    for h in items:
        fig.add_trace(go.Scatter(
            x=[0, 1], y=[h["itc_rank"], h["rank"]], mode="lines+markers", line=dict(color=colour(h), width=1.5),
            marker=dict(size=6), hovertext=[hover(h)] * 2, hoverinfo="text", showlegend=False), 1, 2)
    fig.update_xaxes(tickvals=[0, 1], ticktext=["ITC", "final"], range=[-0.2, 1.2], row=1, col=2)
    fig.update_yaxes(title_text="rank", range=[n + 0.5, 0.5], row=1, col=2)  # rank 1 on top
    return _layout(fig, "Scores per result (green: moved up by re-ranking, red: down)")


def embedding_figure(xy: np.ndarray, labels: Sequence[str], ids: Sequence[str], explained: Sequence[float],
                     total: int, query_xy: np.ndarray | None = None, query_name: str = "query",
                     hits: Sequence[tuple[int, float, float, str]] = ()) -> go.Figure:
    """The gallery's ITC embeddings on their first two principal axes, coloured by class, with
    the query (a star) and the results (open circles labelled by rank).

    hits: (rank, x, y, image id) of the results to mark."""
    fig = go.Figure()
    labels = [lab or "(no label)" for lab in labels]
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    keep = sorted(counts, key=lambda k: (-counts[k], k))[:MAX_CLASSES - 1] if len(counts) > MAX_CLASSES else \
        sorted(counts)
    shown = [lab if lab in keep else "other" for lab in labels]
    lab_arr = np.asarray(shown, dtype=object)
    ids_arr = np.asarray(ids, dtype=object)
    for i, lab in enumerate(sorted(set(shown), key=lambda k: (k == "other", k))):
        sel = np.flatnonzero(lab_arr == lab)
        fig.add_trace(go.Scattergl(
            x=xy[sel, 0], y=xy[sel, 1], mode="markers", name=_text(lab),
            marker=dict(size=5, color=PALETTE[i % len(PALETTE)] if lab != "other" else "#bbbbbb", opacity=0.65),
            hovertext=[_text(f"{iid} · {lab}") for iid in ids_arr[sel]], hoverinfo="text"))
    if hits:
        fig.add_trace(go.Scatter(
            x=[h[1] for h in hits], y=[h[2] for h in hits], mode="markers+text", name="results",
            text=[f"#{h[0]}" for h in hits], textposition="top center", textfont=dict(size=10),
            marker=dict(size=12, color="rgba(0,0,0,0)", line=dict(width=2, color="#111")),
            hovertext=[f"#{h[0]} · {_text(h[3])}" for h in hits], hoverinfo="text"))
    if query_xy is not None:
        fig.add_trace(go.Scatter(
            x=[float(query_xy[0])], y=[float(query_xy[1])], mode="markers", name="query",
            marker=dict(symbol="star", size=18, color="#ffd700", line=dict(width=1.5, color="#111")),
            hovertext=[_text(query_name)], hoverinfo="text"))
    sub = f"{len(xy):,} of {total:,} images" if len(xy) < total else f"{total:,} images"
    fig.update_xaxes(title_text=f"PC1 ({100 * explained[0]:.0f}% of variance)", zeroline=False)
    fig.update_yaxes(title_text=f"PC2 ({100 * explained[1]:.0f}%)", zeroline=False)
    return _layout(fig, f"Gallery embedding map (PCA of ITC embeddings, {sub})", height=460)


def _png_data_url(rgb: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _outline(boxes) -> tuple[list, list]:
    """x / y of each [w, s, e, n] box's outline, the boxes apart (None between them)."""
    xs, ys = [], []
    for w, s, e, n in boxes:
        xs += [w, e, e, w, w, None]
        ys += [s, s, n, n, s, None]
    return xs, ys


def _map_zoom(west: float, south: float, east: float, north: float, width_px: int = 700,
              height_px: int = 420) -> float:
    """The web-map zoom that shows the box with some margin (Web Mercator; MapLibre's zoom z
    spans the world in 512 * 2**z pixels)."""
    span_x = max(east - west, 1e-6) * 1.3
    lat = np.radians(np.clip([south, north], -85, 85))
    merc = np.log(np.tan(np.pi / 4 + lat / 2))
    span_y = max(float(merc[1] - merc[0]), 1e-8) * 1.3
    zoom = min(np.log2(360.0 * width_px / 512 / span_x), np.log2(2 * np.pi * height_px / 512 / span_y))
    return float(np.clip(zoom, 0, 21))


def geo_figure(scenes: Sequence[tuple[np.ndarray, Sequence[float]]], chips: Sequence[Sequence[float]],
               hits: Sequence[tuple[int, Sequence[float], str]] = (),
               bbox: Sequence[float] | None = None, tiles: tuple[str, str] | None = None) -> go.Figure:
    """Where the results are: each scene's own overview as the background, every indexed chip's
    footprint faint, the hits' footprints labelled by rank, the search box dashed.

    scenes: (overview RGB, [west, south, east, north]); chips: [w, s, e, n] of each chip;
    hits: (rank, [w, s, e, n], image id); all in WGS84 degrees. tiles: (XYZ tile URL template,
    attribution) of a web basemap under the overviews (a MapLibre map the browser fills from
    that server), or None: a plain lon/lat plot, nothing fetched (offline).

    Either way the rank markers carry the rank as customdata: a click on one opens that result
    (demo/layout.py GEO_CLICK_JS)."""
    on_map = tiles is not None
    Trace = go.Scattermap if on_map else go.Scatter

    def xy(xs, ys) -> dict:
        return dict(lon=xs, lat=ys) if on_map else dict(x=xs, y=ys)

    fig = go.Figure()
    layers = []
    for rgb, (w, s, e, n) in scenes:
        url = _png_data_url(rgb)
        if on_map:
            layers.append(dict(sourcetype="image", source=url, coordinates=[[w, n], [e, n], [e, s], [w, s]],
                               below="traces", opacity=0.9))
        else:
            fig.add_layout_image(source=url, xref="x", yref="y", x=w, y=n, sizex=e - w, sizey=n - s,
                                 sizing="stretch", layer="below", opacity=0.9)
    if len(chips):
        fig.add_trace(Trace(**xy(*_outline(chips)), mode="lines", name="indexed chips", hoverinfo="skip",
                            line=dict(width=0.6 if not on_map else 1, color="rgba(255,255,255,0.45)")))
    if bbox is not None:
        line = dict(width=2, color="#00e5ff") | ({} if on_map else dict(dash="dash"))  # maps draw no dashes
        fig.add_trace(Trace(**xy(*_outline([bbox])), mode="lines", name="search box", hoverinfo="skip", line=line))
    if hits:
        fig.add_trace(Trace(**xy(*_outline([h[1] for h in hits])), mode="lines", name="results",
                            hoverinfo="skip", line=dict(width=2.5, color="#ffd700")))
        marker = dict(size=26, color="rgba(255,215,0,0.18)") | ({} if on_map else dict(symbol="square"))
        font = dict(size=15, color="#ffd700") | ({} if on_map else dict(weight="bold", shadow="1px 1px 2px #000"))
        fig.add_trace(Trace(
            **xy([(h[1][0] + h[1][2]) / 2 for h in hits], [(h[1][1] + h[1][3]) / 2 for h in hits]),
            mode="markers+text", name="rank", text=[f"#{h[0]}" for h in hits], showlegend=False,
            customdata=[h[0] for h in hits], marker=marker, textfont=font,
            hovertext=[f"#{h[0]} · {_text(h[2])} · lon {(h[1][0] + h[1][2]) / 2:.5f}, lat {(h[1][1] + h[1][3]) / 2:.5f}"
                       for h in hits], hoverinfo="text"))
    title = f"Where the results are ({len(hits)} of {len(chips):,} chips)"
    boxes = [b for _, b in scenes] + [list(c) for c in chips]
    if on_map:
        url, attribution = tiles
        layers.insert(0, dict(sourcetype="raster", source=[url], sourceattribution=attribution, below="traces"))
        w, s = (min(b[0] for b in boxes), min(b[1] for b in boxes)) if boxes else (0.0, 0.0)
        e, n = (max(b[2] for b in boxes), max(b[3] for b in boxes)) if boxes else (0.0, 0.0)
        fig.update_layout(map=dict(style="white-bg", layers=layers, center=dict(lon=(w + e) / 2, lat=(s + n) / 2),
                                   zoom=_map_zoom(w, s, e, n) if boxes else 1))
        _layout(fig, title, height=480)
        fig.update_layout(margin=dict(l=10, r=10, t=50, b=10))
        return fig
    fig.update_xaxes(title_text="longitude (°)", showgrid=False, zeroline=False)
    fig.update_yaxes(title_text="latitude (°)", showgrid=False, zeroline=False, scaleanchor="x",
                     scaleratio=1 / max(0.05, float(np.cos(np.radians(np.mean([b[1][1] for b in scenes] or [0]))))))
    return _layout(fig, title, height=480)


def feedback_timeline_figure(per_hour, per_day) -> go.Figure:
    """Judgements over time, stacked by label: per hour when they span under three days,
    else per day. per_hour / per_day: envlf.feedback.store.summary tables."""
    table, unit = (per_hour, "hour") if len(per_day) <= 3 else (per_day, "day")
    if table is None or len(table) == 0:
        return empty_figure("no judgements yet")
    fig = go.Figure()
    colours = {"relevant": UP, "not_relevant": DOWN}
    for col in table.columns:
        fig.add_trace(go.Bar(x=[t.isoformat() for t in table.index], y=table[col].tolist(), name=str(col),
                             marker_color=colours.get(str(col), "#888")))
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text=f"time (UTC, per {unit})")
    fig.update_yaxes(title_text="judgements")
    return _layout(fig, "Labels over time", height=320)


def precision_figure(precision_at_k, judged_at_k=None) -> go.Figure:
    """Mean precision@k as judged (envlf.feedback.store.summary's precision_at_k), each bar labelled
    with the number of judged results it rests on (judged_at_k) when given."""
    vals = [None if np.isnan(v) else float(v) for v in precision_at_k.tolist()]
    if all(v is None for v in vals):
        return empty_figure("no judged results yet")
    counts = [None] * len(vals) if judged_at_k is None else [int(judged_at_k[k]) for k in precision_at_k.index]
    text = ["–" if v is None else f"{v:.2f}" + ("" if n is None else f" ({n} judged)") for v, n in zip(vals, counts)]
    fig = go.Figure(go.Bar(x=list(precision_at_k.index), y=[v if v is not None else 0 for v in vals],
                           text=text, textposition="outside", marker_color="#1f77b4"))
    fig.update_yaxes(range=[0, 1.1], title_text="share judged relevant")
    return _layout(fig, "Precision of the top results, as judged (mean over queries)", height=320)
