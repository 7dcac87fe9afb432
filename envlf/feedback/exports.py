"""Exports of the collected relevance labels, in the formats the ecosystem reads.

- **TREC qrels** (`to_qrels` / `read_qrels`): lines ``qid 0 docid rel`` that trec_eval,
  ir_measures, pytrec_eval and ranx read, plus a query file ``qid<TAB>query``
  (`read_queries`).
- **JSONL** (`to_jsonl` / `read_jsonl`): one line per query with its judged positives and
  negatives, for fine-tuning with hard negatives; an item that is a chip of a georeferenced
  scene keeps its ``lon``, ``lat``.

Rules shared by both:

- ``qid = "q" + sha1(direction + TAB + query)[:12]`` where the query is the t2i text with
  whitespace collapsed, else ``image:<query_image_id>`` or, for an upload without an id,
  ``image:sha256:<hex>`` (`envlf.feedback.store.query_key`). It is stable across runs and files.
- **The latest judgement wins**: when the same (direction, query, item) was judged several
  times (re-judged, or by several annotators) only the one with the greatest ``time_utc``
  counts; equal times fall back to input order, later rows winning
  (`envlf.feedback.store.latest_judgements`).
- ``rel`` is the grade (0-3) when given, else 1 for ``relevant`` and 0 for ``not_relevant``.
- docids (= ``item_id``) with whitespace or ``%`` are percent-encoded in the qrels file
  (``"a b.tif"`` -> ``a%20b.tif``), because qrels are whitespace-separated; `read_qrels`
  decodes them.

CLI::

    envlf export --feedback FILE [FILE ...] --qrels OUT.qrels --queries OUT.tsv --jsonl OUT.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from envlf.feedback.store import latest_judgements, read_feedback

if TYPE_CHECKING:
    import pandas as pd

QRELS_COLUMNS = ("qid", "iteration", "docid", "rel")
_QRELS_UNSAFE = re.compile(r"[%\s]")


def _quote_token(text: str) -> str:
    """Percent-encode whitespace and '%' so a docid is one qrels token."""
    return _QRELS_UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), text)


def _one_line(text: str) -> str:
    return " ".join(str(text).replace("\t", " ").splitlines())


def _write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write via a temporary file + rename: readers never see a half-written export."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_qrels(df: pd.DataFrame, path: str | os.PathLike, queries_path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Write TREC qrels (``qid 0 docid rel``) and the query file ``qid<TAB>query``.

    Returns the judgements written (one per (query, item), latest wins) with columns
    ``qid, iteration, docid, rel, direction, query``. Lines are sorted by qid, then docid.
    ``queries_path=None`` writes no query file.
    """
    latest = latest_judgements(df)
    latest = latest.assign(iteration=0, docid=latest["item_id"])
    latest = latest.sort_values(["qid", "docid"], kind="stable").reset_index(drop=True)
    lines = [f"{q} 0 {_quote_token(d)} {int(r)}\n" for q, d, r in zip(latest["qid"], latest["docid"], latest["rel"])]
    _write_atomic(path, "".join(lines))
    if queries_path is not None:
        queries = latest.drop_duplicates("qid")
        _write_atomic(queries_path, "".join(f"{q}\t{_one_line(t)}\n" for q, t in zip(queries["qid"], queries["query"])))
    return latest[["qid", "iteration", "docid", "rel", "direction", "query"]]


def read_qrels(path: str | os.PathLike) -> pd.DataFrame:
    """Read a TREC qrels file: DataFrame with columns ``qid, iteration, docid, rel`` (ints
    for iteration and rel). Percent-encoded docids are decoded. ValueError names a bad line."""
    import pandas as pd

    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise ValueError(f"{path}:{n}: expected 'qid iteration docid rel', got {len(parts)} fields")
            qid, iteration, docid, rel = parts
            try:
                rows.append((qid, int(iteration), unquote(docid), int(rel)))
            except ValueError:
                raise ValueError(f"{path}:{n}: iteration and rel must be integers: {line.strip()!r}") from None
    out = pd.DataFrame(rows, columns=list(QRELS_COLUMNS))
    return out.astype({"qid": object, "iteration": "int64", "docid": object, "rel": "int64"})


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``qid<TAB>query`` file into {qid: query}."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            qid, sep, text = line.partition("\t")
            if not sep:
                raise ValueError(f"{path}:{n}: expected 'qid<TAB>query'")
            out[qid] = text
    return out


def jsonl_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """One record per query (in order of first appearance), positives (rel >= 1) and
    negatives (rel == 0) as ``{"item_id", "item_text", "rank", "grade"?}`` in rank order."""
    latest = latest_judgements(df)
    records: dict[str, dict[str, Any]] = {}
    order = {qid: i for i, qid in enumerate(dict.fromkeys(latest["qid"]))}
    for row in latest.sort_values("rank", kind="stable").itertuples(index=False):
        rec = records.get(row.qid)
        if rec is None:
            rec = records[row.qid] = {
                "qid": row.qid,
                "direction": row.direction,
                "query": row.query,  # the t2i text, or image:<id> / image:sha256:<hex>
                "query_text": row.query_text,
                "query_image_id": row.query_image_id,
                "query_image_sha256": row.query_image_sha256,
                "positives": [],
                "negatives": [],
            }
        item: dict[str, Any] = {"item_id": row.item_id, "item_text": row.item_text, "rank": int(row.rank)}
        if not _is_na(row.grade):
            item["grade"] = int(row.grade)
        if not _is_na(getattr(row, "lon", None)):  # a chip of a georeferenced scene
            item["lon"], item["lat"] = float(row.lon), float(row.lat)
        rec["positives" if row.rel >= 1 else "negatives"].append(item)
    return sorted(records.values(), key=lambda r: order[r["qid"]])


def _is_na(value: Any) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def to_jsonl(df: pd.DataFrame, path: str | os.PathLike) -> int:
    """Write `jsonl_records` as UTF-8 JSON lines; returns the number of lines."""
    records = jsonl_records(df)
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines file (blank lines ignored); ValueError names a bad line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="envlf export", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  envlf export --feedback ~/.cache/envlf/feedback.csv --qrels labels.qrels --jsonl labels.jsonl",
        description="Export EnVLF relevance feedback CSVs to TREC qrels and JSONL (latest judgement wins).")
    parser.add_argument("--feedback", nargs="+", required=True, metavar="FILE", help="feedback CSV file(s)")
    parser.add_argument("--qrels", metavar="OUT.qrels", help="TREC qrels to write")
    parser.add_argument("--queries", metavar="OUT.tsv",
                        help="query file (qid<TAB>query) to write; default: next to --qrels as <name>.queries.tsv")
    parser.add_argument("--jsonl", metavar="OUT.jsonl", help="JSON lines (query, positives, negatives) to write")
    args = parser.parse_args(argv)
    if args.queries and not args.qrels:
        parser.error("--queries needs --qrels")
    try:
        df, report = read_feedback(args.feedback)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    if args.qrels:
        queries = args.queries or str(Path(args.qrels).with_suffix(".queries.tsv"))
        written = to_qrels(df, args.qrels, queries)
        print(f"wrote {len(written)} judgements for {written['qid'].nunique()} queries "
              f"to {args.qrels} (queries: {queries})")
    if args.jsonl:
        n = to_jsonl(df, args.jsonl)
        print(f"wrote {n} queries to {args.jsonl}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
