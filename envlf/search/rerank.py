"""The re-rank score: the one definition of the order re-ranked results come in. Search
(`envlf.search.engine`), evaluation (`envlf.evaluation.evaluate`) and so the app all rank the
ITC top k by it, so the figures evaluate reports are of the order the app shows
(tests/test_index.py::test_search_shows_the_order_evaluate_scores).

    score = ITM logit margin + blend x ITC logit      (ITC logit = cosine x learned temperature)

`blend` defaults to the model's `config.fusion.rerank_blend`.
"""

from __future__ import annotations

import numpy as np


def rerank_score(model, margins, itc, blend: float | None = None):
    """Re-ranked score of candidates from their ITM margins and ITC cosines (numpy arrays or
    tensors of one shape)."""
    blend = float(model.config.fusion.rerank_blend if blend is None else blend)
    return margins + blend * float(model.temperature_scale().detach()) * itc


def rerank_order(model, itc: np.ndarray, margins: np.ndarray | None, n_rerank: int,
                 blend: float | None = None) -> np.ndarray:
    """Final order of candidates sorted by ITC: the first n_rerank by their re-rank score (ITC
    breaks ties), then the rest as they were."""
    if margins is None or n_rerank == 0:
        return np.arange(len(itc))
    head = np.lexsort((-itc[:n_rerank], -rerank_score(model, margins[:n_rerank], itc[:n_rerank], blend)))
    return np.concatenate([head, np.arange(n_rerank, len(itc))])
