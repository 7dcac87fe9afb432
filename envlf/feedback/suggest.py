"""Label suggestions (active learning): which search results would teach the model most.

The two stages of search disagree in a useful way. ITC (dual encoder) ranks every
candidate; the fusion encoder (ITM) re-scores the top ``R`` of them. A judgement teaches the
model most where it is unsure or where its two stages contradict each other, so every
re-ranked hit gets

    uncertainty   u = exp(-|m| / tau)                        in (0, 1]
                  m = ITM logit margin (match - no match); u = 1 on the decision boundary
                  (m = 0, P(match) = 0.5) and falls to 0.37 at |m| = tau (tau = 1 logit).
    disagreement  d = |itc_rank - itm_rank| / (R - 1)         in [0, 1]
                  itm_rank = the hit's final rank (re-ranked hits come first, ordered by
                  ITM), itc_rank = its rank by ITC alone. d = 1 when re-ranking moved it
                  from the top of the ITC list to the bottom of the re-ranked list or back
                  ("ITC high & ITM low" or vice versa); 0 when both stages agree.
    score         s = w_u * u + w_d * d                       (w_u = w_d = 1 by default)

Hits without an ITM score (not re-ranked: below rerank_k, or re-ranking off) carry no
information about the fusion encoder and are never suggested. ``reason`` says in words
which part dominated ("ITM unsure: margin +0.21 (P=0.55); ITC #9 -> ITM #1").

API (what the app's "label these next" view calls):

    from envlf.feedback.suggest import suggest
    for s in suggest(engine, ["two planes beside a terminal", "a harbour"], n=10):
        query, hit, score, reason = s          # also s.direction, s.item_id, s.uncertainty, ...

``queries`` may also hold `SearchResult`s already computed (then nothing is searched
again), and, with ``direction="i2t"``, gallery image ids. ``exclude`` takes (query, item_id)
pairs already judged; `judged_pairs(df)` builds it from the feedback CSV
(`envlf.feedback.store.read_feedback`), with the same query keys and item ids the app writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from envlf.feedback.store import query_key
from envlf.search.engine import CaptionHit, ImageHit, SearchResult

TAU = 1.0  # ITM margin (logits) at which uncertainty has fallen to 1/e


@dataclass
class Suggestion:
    """One result worth judging. Iterates as (query, hit, score, reason)."""

    query: str  # SearchResult.query: the text (t2i) or "image:<id>" (i2t)
    hit: ImageHit | CaptionHit
    score: float
    reason: str
    direction: str = "t2i"
    uncertainty: float = 0.0
    disagreement: float = 0.0

    @property
    def item_id(self) -> str:
        """What the app writes to the feedback CSV's item_id for this hit."""
        return item_key(self.hit)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.query, self.hit, self.score, self.reason))


def item_key(hit: ImageHit | CaptionHit) -> str:
    """The feedback CSV's item_id of a hit: image id (t2i, i2i) or caption id (i2t)."""
    return hit.image_id if isinstance(hit, ImageHit) else str(hit.caption_id)


def score_hit(hit: ImageHit | CaptionHit, n_reranked: int, tau: float = TAU, w_uncertainty: float = 1.0,
              w_disagreement: float = 1.0) -> tuple[float, float, float] | None:
    """(score, uncertainty, disagreement) of one hit of a result with `n_reranked` re-ranked
    candidates, or None when the hit has no ITM score. See the module docstring."""
    if hit.itm_margin is None or not math.isfinite(hit.itm_margin) or n_reranked < 1:
        return None
    u = math.exp(-abs(hit.itm_margin) / tau)
    d = abs(hit.itc_rank - hit.rank) / (n_reranked - 1) if n_reranked > 1 else 0.0
    d = min(1.0, d)  # ranks of re-ranked hits lie in 1..R, so this only guards odd inputs
    return w_uncertainty * u + w_disagreement * d, u, d


def _reason(hit, u: float, d: float, w_u: float, w_d: float) -> str:
    p = 1.0 / (1.0 + math.exp(-hit.itm_margin))
    unsure = f"ITM unsure: margin {hit.itm_margin:+.2f} (P={p:.2f})"
    if hit.itc_rank == hit.rank:
        moved = f"ITC and ITM agree on #{hit.rank}"
    else:
        way = "up" if hit.rank < hit.itc_rank else "down"
        moved = f"ITC #{hit.itc_rank} -> ITM #{hit.rank} (re-ranking moved it {way} {abs(hit.itc_rank - hit.rank)})"
    if w_d * d > w_u * u:
        return f"stages disagree: {moved}; {unsure}"
    return f"{unsure}; {moved}"


def rank_result(result: SearchResult, tau: float = TAU, w_uncertainty: float = 1.0,
                w_disagreement: float = 1.0) -> list[Suggestion]:
    """Every re-ranked hit of one result as a Suggestion, best first (ties: shown rank)."""
    out = []
    for hit in result.items:
        s = score_hit(hit, result.reranked, tau, w_uncertainty, w_disagreement)
        if s is None:
            continue
        score, u, d = s
        out.append(Suggestion(result.query, hit, score, _reason(hit, u, d, w_uncertainty, w_disagreement),
                              result.direction, u, d))
    out.sort(key=lambda s: (-s.score, s.hit.rank))
    return out


def judged_pairs(df) -> set[tuple[str, str]]:
    """(query, item_id) of every judgement in a feedback DataFrame (`read_feedback`), with
    the query keyed as SearchResult.query is: the text for t2i, "image:<id>" otherwise."""
    return {(query_key(d, t, i, s), str(item))
            for d, t, i, s, item in zip(df["direction"], df["query_text"], df["query_image_id"],
                                        df["query_image_sha256"], df["item_id"])}


def suggest(engine, queries: Iterable[str | SearchResult], n: int = 10, *, direction: str = "t2i", k: int = 16,
            rerank_k: int = 16, exclude: Iterable[tuple[str, str]] = (), per_query: int | None = None,
            tau: float = TAU, w_uncertainty: float = 1.0, w_disagreement: float = 1.0) -> list[Suggestion]:
    """The n results across `queries` whose judgement would teach the model most.

    engine: a `envlf.search.engine.SearchEngine`. queries: texts (t2i), gallery image ids
    (``direction="i2t"``) or ready `SearchResult`s. Each query is searched with k results,
    the top rerank_k re-ranked (only re-ranked hits can be suggested). exclude: (query,
    item_id) pairs already judged (see `judged_pairs`). per_query: at most this many
    suggestions per query (None: no cap), which spreads the labels over queries.
    Returns up to n `Suggestion`s, best first; equal scores keep query order, then rank.
    """
    if direction not in ("t2i", "i2t"):
        raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
    if n <= 0:
        return []
    skip = {(str(q), str(i)) for q, i in exclude}
    pool: list[tuple[float, int, int, Suggestion]] = []
    for qn, q in enumerate(queries):
        if isinstance(q, SearchResult):
            res = q
        elif direction == "t2i":
            res = engine.text_to_image(q, k=max(k, rerank_k), rerank_k=rerank_k)
        else:
            res = engine.image_to_text(image_id=str(q), k=max(k, rerank_k), rerank_k=rerank_k)
        ranked = [s for s in rank_result(res, tau, w_uncertainty, w_disagreement)
                  if (s.query, s.item_id) not in skip]
        if per_query is not None:
            ranked = ranked[:per_query]
        pool += [(-s.score, qn, s.hit.rank, s) for s in ranked]
    pool.sort(key=lambda t: t[:3])
    return [t[3] for t in pool[:n]]


def suggest_queries(results: Sequence[SearchResult], n: int = 100, depth: int = 10, *,
                    exclude: Iterable[tuple[str, str]] = (), tau: float = TAU, w_uncertainty: float = 1.0,
                    w_disagreement: float = 1.0) -> list[Suggestion]:
    """"Label these queries' top results": n judgements as blocks of each chosen query's top
    `depth` re-ranked hits, in rank order, queries chosen for uncertainty *and* diversity.

    A query's worth is the mean hit score (`score_hit`: ITM uncertainty + ITC/ITM disagreement)
    over its top `depth` re-ranked hits not yet judged. Queries are taken greedily: each next one
    maximises worth x (1 - overlap), overlap = the largest Jaccard share of its top-`depth`
    images with those of a query already taken, so the labels cover different parts of the
    archive instead of re-judging the same tiles for near-identical captions. Within a block a
    person judges a whole ranked list: its relevant and not-relevant hits side by side, which
    is what the fine-tune learns most from (single uncertain hits scattered over many queries
    mostly bring negatives without a positive of the same query).
    """
    if n <= 0:
        return []
    skip = {(str(q), str(i)) for q, i in exclude}
    blocks = []
    for res in results:
        hits = [h for h in res.items if h.itm_margin is not None and (res.query, item_key(h)) not in skip]
        hits = sorted(hits, key=lambda h: h.rank)[:depth]
        scored = [(h, score_hit(h, res.reranked, tau, w_uncertainty, w_disagreement)) for h in hits]
        scored = [(h, sc) for h, sc in scored if sc is not None]
        if not scored:
            continue
        worth = sum(sc[0] for _, sc in scored) / len(scored)
        blocks.append((worth, res, scored, frozenset(item_key(h) for h, _ in scored)))
    out: list[Suggestion] = []
    taken: list[frozenset] = []
    while blocks and len(out) < n:
        def value(b) -> float:
            overlap = max((len(b[3] & t) / len(b[3] | t) for t in taken), default=0.0)
            return b[0] * (1.0 - overlap)

        best = max(range(len(blocks)), key=lambda i: (value(blocks[i]), -i))
        worth, res, scored, items = blocks.pop(best)
        taken.append(items)
        for h, (score, u, d) in scored[:n - len(out)]:
            out.append(Suggestion(res.query, h, score, f"query block (worth {worth:.2f}): "
                                  + _reason(h, u, d, w_uncertainty, w_disagreement), res.direction, u, d))
    return out


def format_suggestions(suggestions: Sequence[Suggestion]) -> str:
    """A plain-text table (CLI, logs)."""
    lines = []
    for s in suggestions:
        what = s.hit.image_id if isinstance(s.hit, ImageHit) else repr(s.hit.text[:50])
        lines.append(f"{s.score:5.2f}  {s.query[:40]!r:44} #{s.hit.rank:<3} {what:30}  {s.reason}")
    return "\n".join(lines)
