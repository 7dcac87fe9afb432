"""Index a gallery for the app, in a process of its own (the app starts it when --gallery has
no index yet and serves its page meanwhile):

    python -m demo.build_gallery --checkpoint DIR --gallery DATASET --out DIR [--captions FILE ...]

One build per output directory (flock on ``<out>.lock``; a second one exits at once); its
progress in ``<out>.status.json`` (envlf.bootstrap.StatusWriter), which the app polls.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    from envlf.bootstrap import BuildBusy, Stage, StatusWriter, _lock
    from envlf.runtime import background

    ap = argparse.ArgumentParser(prog="python -m demo.build_gallery", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--gallery", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--captions", action="append", default=[])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    background()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _lock(out.with_name(out.name + ".lock"), wait=False):
            status = StatusWriter(out.with_name(out.name + ".status.json"), 1)
            status.stage(0, Stage("index", "", 0, "", "", {}, f"index of {args.gallery}"))
            try:
                from envlf.model.core import load_pretrained
                from envlf.data.datasets import load_dataset
                from envlf.search.index import GalleryIndex, IndexLoadError

                model = load_pretrained(args.checkpoint)
                try:
                    GalleryIndex.load(out, model)
                    status.finish("done")
                    return 0
                except IndexLoadError:
                    pass
                status.update(0.01, f"reading {args.gallery}", boundary=True)
                try:
                    ds = load_dataset(args.gallery)
                except ValueError as e:
                    raise SystemExit(f"gallery: {e}") from None
                GalleryIndex.build(model, ds, out, caption_files=args.captions, progress=False, workers=args.workers,
                                   on_batch=lambda d, t: status.update(0.02 + 0.93 * d / max(1, t),
                                                                       f"indexing image {d}/{t}"))
                status.finish("done")
            except BaseException as e:
                status.finish("failed", str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
                raise
    except BuildBusy as e:
        print(f"{e}: leaving it to that process", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
