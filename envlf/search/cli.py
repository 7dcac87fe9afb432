"""`envlf index build|add|extract|info|search` (alias: python -m envlf.search.cli): build,
grow, inspect and query a gallery index from the command line. The index itself is
`envlf.search.index.GalleryIndex`; the query path is `envlf.search.engine.SearchEngine`;
`extract` (envlf.search.extract) writes sharded embeddings with Ray that `build
--from-shards` reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from envlf.data.datasets import CaptionDataset, load_dataset, load_image
from envlf.data.geotiff import ChipOptions, chip_scenes, is_scene_source, parse_bands, plan_scenes
from envlf.model.core import load_pretrained
from envlf.model.onnx import RUNTIMES
from envlf.runtime import resolve_device
from envlf.search.engine import SearchEngine
from envlf.search.index import GalleryIndex


def _source(spec: str, split: str | None, args=None, index: GalleryIndex | None = None,
            out: str | None = None) -> CaptionDataset:
    """The images to index: a dataset, or GeoTIFF scenes chipped into `chips` (default
    ``<index>.chips/``; envlf.data.geotiff), in the CRS of the index they join."""
    if not is_scene_source(spec):
        ds = load_dataset(spec)
        return ds.split(split) if split else ds
    opts = ChipOptions(args.chip_size, args.chip_overlap, parse_bands(args.bands), args.min_valid)
    target = Path(index.dir if index is not None else out)
    known = {}
    if index is not None:
        known = {str(Path(scene)): iid.split("/")[0] for scene, iid in
                 index.geo_frame()[["scene", "image_id"]].itertuples(index=False)}
    return chip_scenes(spec, target.parent / f"{target.name}.chips", opts,
                       crs=index.crs if index is not None else None, known=known)


def _extract_source(args, out: Path):
    """What `index extract` plans: a dataset, or GeoTIFF scenes' chips planned (not cut: the
    job's workers cut them into ``<out>/chips/``) with their chipping recipe."""
    if not is_scene_source(args.source):
        return _source(args.source, args.split, args)
    opts = ChipOptions(args.chip_size, args.chip_overlap, parse_bands(args.bands), args.min_valid)
    return plan_scenes(args.source, out / "chips", opts)


def _runtime(args) -> str:
    """--runtime, or what --onnx / --onnx-int8 are short for."""
    return args.runtime or ("onnx-int8" if args.onnx_int8 else "onnx" if args.onnx else "torch")


# long: the argument table of the index subcommands (build, add, extract, info, search) and their dispatch
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="envlf index", description="Build, grow, inspect and query a gallery index.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  envlf index build --checkpoint runs/ucm-lite4/best "
                                       "--source ../shared/datasets/ucm-captions --out indexes/ucm")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="encode a gallery into a new index directory")
    b.add_argument("--checkpoint", required=True)
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="dataset dir / JSON / CSV / image folder, or GeoTIFF scene(s): a .tif or a folder of them")
    src.add_argument("--from-shards", help="the --out of a finished envlf index extract job")
    b.add_argument("--split", default=None, help="only this split of the source (default: all)")
    b.add_argument("--out", required=True)
    b.add_argument("--captions", nargs="*", default=[], help="caption corpora for image->text search")
    b.add_argument("--store-tokens", default="auto", choices=["auto", "yes", "no"])
    b.add_argument("--ann", default="auto", choices=["auto", "flat", "ivf", "ivfpq", "hnsw"],
                   help="nearest-neighbour index: auto (exact up to 100k, then ivf); ivfpq keeps 64 bytes a chip in RAM")
    a = sub.add_parser("add", help="add images (and caption corpora) to an existing index")
    a.add_argument("--index", required=True)
    a.add_argument("--checkpoint", required=True)
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--source")
    src.add_argument("--from-shards", help="the --out of a finished envlf index extract job")
    x = sub.add_parser("extract", help="encode a large archive into sharded embeddings with Ray (resumable)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  envlf index extract --checkpoint runs/ucm-lite4/best --source scenes/ "
                              "--out shards/archive\n  envlf index build --checkpoint runs/ucm-lite4/best "
                              "--from-shards shards/archive --out indexes/archive\n"
                              "Run the same command again to resume a killed job.")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--source", required=True)
    x.add_argument("--split", default=None)
    x.add_argument("--out", required=True, help="the shard directory")
    x.add_argument("--shard-size", type=int, default=1024, help="images per shard (the unit redone after a kill)")
    x.add_argument("--address", default=None, help="a Ray cluster (ray://host:10001 or auto); default: a local Ray")
    x.add_argument("--store-tokens", default="yes", choices=["yes", "no"],
                   help="keep the patch tokens for re-ranking (50 KB per lite image)")
    a.add_argument("--split", default=None)
    a.add_argument("--captions", nargs="*", default=[])
    i = sub.add_parser("info", help="what an index holds")
    i.add_argument("--index", required=True)
    s = sub.add_parser("search", help="query an index from the command line", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  envlf search --index indexes/ucm --checkpoint runs/ucm-lite4/best "
                              "--text \"storage tanks beside a harbour\" -k 10")
    s.add_argument("--index", required=True)
    s.add_argument("--checkpoint", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="text -> image")
    g.add_argument("--image", help="image file -> captions")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--rerank-k", type=int, default=16, help="0: ITC only")
    for q in (b, a, s, x):
        q.add_argument("--device", default="auto")
    for q in (b, a, s, x):
        q.add_argument("--runtime", choices=RUNTIMES, default=None,
                       help="what encodes images: torch (default), or the ONNX export of the image side (made once, "
                            "beside the checkpoint) run by ONNX Runtime (onnx, onnx-int8) or OpenVINO (openvino, "
                            "openvino-bf16)")
        q.add_argument("--onnx", action="store_true", help="short for --runtime onnx")
        q.add_argument("--onnx-int8", action="store_true", help="short for --runtime onnx-int8")
    for q in (b, a, x):
        q.add_argument("--batch-size", type=int, default=32)
        q.add_argument("--workers", type=int, default=2, help="image loader processes (extract: Ray actors)")
        d = ChipOptions()
        q.add_argument("--chip-size", type=int, default=d.size, help="GeoTIFF scenes: chip side in pixels")
        q.add_argument("--chip-overlap", type=int, default=d.overlap, help="GeoTIFF scenes: pixels chips share")
        q.add_argument("--bands", default="", help="GeoTIFF scenes: R,G,B band numbers (default 1,2,3)")
        q.add_argument("--min-valid", type=float, default=d.min_valid,
                       help="GeoTIFF scenes: skip chips with a smaller share of valid (not nodata) pixels")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        if args.cmd == "info":
            print(json.dumps(GalleryIndex.load(args.index).info(), indent=2))
            return 0
        if args.cmd == "extract":
            from envlf.search.extract import run_extract

            encoder = _runtime(args)
            out = Path(args.out)
            summary = run_extract(args.checkpoint, args.source if not args.split else f"{args.source}:{args.split}", out,
                                  lambda: _extract_source(args, out),
                                  shard_size=args.shard_size, address=args.address, workers=args.workers,
                                  batch_size=args.batch_size, tokens=args.store_tokens == "yes", encoder=encoder,
                                  device=resolve_device(args.device))
            print(json.dumps(summary, indent=2))
            return 0
        model = load_pretrained(args.checkpoint, device=resolve_device(args.device))
        shards = getattr(args, "from_shards", None)
        encoder = None
        if hasattr(args, "runtime") and _runtime(args) != "torch":
            from envlf.model.onnx import load_image_encoder

            encoder = load_image_encoder(model, args.checkpoint, _runtime(args))
        if args.cmd == "build":
            source = None if shards else _source(args.source, args.split, args, out=args.out)
            idx = GalleryIndex.build(model, source, args.out, args.captions, args.store_tokens, args.batch_size,
                                     args.workers, args.ann, image_encoder=encoder, shards=shards)
            print(json.dumps({k: v for k, v in idx.info().items() if k != "labels"}, indent=2))
        elif args.cmd == "add":
            idx = GalleryIndex.load(args.index, model)
            if shards:
                idx = idx.add_shards(model, shards, args.captions)
            else:
                idx = idx.add(model, _source(args.source, args.split, args, index=idx), args.captions,
                              args.batch_size, args.workers, image_encoder=encoder)
            print(json.dumps(idx.manifest["history"][-1], indent=2))
        else:
            engine = SearchEngine(model, GalleryIndex.load(args.index, model), image_encoder=encoder)
            if args.text:
                res = engine.text_to_image(args.text, k=args.k, rerank_k=args.rerank_k)
                for r in res.items:
                    where = f"  lon={r.geo['lon']:.6f} lat={r.geo['lat']:.6f}" if r.geo else ""
                    print(f"{r.rank:3d}  itc={r.itc:.3f}  itm={'-' if r.itm is None else f'{r.itm:.3f}'}  "
                          f"{r.image_id}  {r.label}  {r.path}{where}")
            else:
                res = engine.image_to_text(load_image(args.image), k=args.k, rerank_k=args.rerank_k)
                for r in res.items:
                    print(f"{r.rank:3d}  itc={r.itc:.3f}  itm={'-' if r.itm is None else f'{r.itm:.3f}'}  "
                          f"x{r.count}  {r.text}")
            print(f"timings (ms): {json.dumps({k: round(v, 1) for k, v in res.timings_ms.items()})}")
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
