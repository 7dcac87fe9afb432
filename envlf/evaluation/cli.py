"""`envlf evaluate`: a checkpoint's recalls on one split of a dataset, ITC and re-ranked.

    envlf evaluate --checkpoint runs/ucm-lite4/best --data ../shared/datasets/ucm-captions \
        --split val --rerank-k 16 --k-sweep 1,4,8,16,32 --json runs/ucm-lite4/eval-val.json

The command line around `envlf.evaluation.evaluate.evaluate`. It is the edge that knows
where the data may come from, so it adds the demo world's "content oracle" reference row
(`envlf.world.truth`): the scorer answers None on any other dataset and the row is left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from envlf.data.datasets import CaptionDataset, check_images, load_dataset
from envlf.evaluation import evaluate as E
from envlf.evaluation.pointing import format_pointing, pointing_game
from envlf.evaluation.report import write_report
from envlf.model.checkpoint import CheckpointError
from envlf.model.core import load_pretrained
from envlf.runtime import resolve_device
from envlf.world.truth import content_oracle_scores

log = logging.getLogger(__name__)

# what reading the demo world's stated content (nouns, numbers, colours, sizes) alone is worth
ORACLES: dict[str, E.Oracle] = {"content oracle": content_oracle_scores}


def load_split(spec: str, split: str, check: bool = True, workers: int = 2) -> CaptionDataset:
    ds = load_dataset(spec).split(split)
    if check:
        ds, problems = check_images(ds, max_workers=workers, decode=False)
        for p in problems:
            log.warning("skipped: %s", p)
    return ds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="envlf evaluate", description=E.__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  envlf evaluate --checkpoint runs/ucm-lite4/best --data ../shared/datasets/ucm-captions "
                                       "--split val --rerank-k 16")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="dataset: Karpathy dir/JSON, precomp dir, CSV or image folder")
    p.add_argument("--split", default="val")
    p.add_argument("--rerank-k", type=int, default=16, help="candidates the fusion encoder re-scores (0: ITC only)")
    p.add_argument("--k-sweep", default="", help="comma-separated k values to report as well, e.g. 1,4,8,16,32")
    p.add_argument("--blend", type=float, default=None,
                   help="final = ITM margin + blend * ITC logit (default: the model's fusion.rerank_blend)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--pointing", action="store_true", help="also run the pointing game (datasets with masks)")
    p.add_argument("--pointing-grid", type=int, default=None,
                   help="attention-map grid for the pointing game (default: the model's fusion.gradcam_grid, "
                        "else its own grid; e.g. 8 to score lite on its training grid)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--report", metavar="DIR", help="also write what the model confuses into DIR: per-class R@1 "
                   "(per_class.md/.csv) and the 20 worst text->image queries with their top results "
                   "(worst.html, worst.png)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        model = load_pretrained(args.checkpoint, device=resolve_device(args.device))
        if args.pointing:  # before the retrieval stage, not after it
            model.vision.check_grid(args.pointing_grid)
        ds = load_split(args.data, args.split, workers=args.workers)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ks = [int(k) for k in args.k_sweep.split(",") if k.strip()]
    scores: dict = {}
    report = E.evaluate(model, ds, args.rerank_k, ks, args.blend, args.batch_size, args.workers, oracles=ORACLES,
                        scores=scores)
    report["checkpoint"] = str(args.checkpoint)
    report["split"] = args.split
    if args.pointing:
        report["pointing"] = pointing_game(model, ds, grid=args.pointing_grid)
    print(E.format_report(report))
    if args.pointing:
        print("\n" + format_pointing(report["pointing"]))
    if args.report:
        stage = f"re-ranked top {args.rerank_k}" if args.rerank_k else "ITC"
        written = write_report(args.report, ds, scores["i2t"], scores["t2i"],
                               f"{ds.name} {args.split}, {Path(args.checkpoint).name} ({stage})")
        print("\nreport: " + ", ".join(str(w) for w in written))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
