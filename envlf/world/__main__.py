"""CLI: ``envlf world generate|sheet``.

    envlf world generate --out DIR [--n 1500] [--seed 0] [--workers N]
    envlf world scenes --data DIR --out scenes/ [--n 2] [--grid 3] [--dtype uint8|uint16]
    envlf world sheet --data DIR [--out sheet.png] [--n 16]
"""

from __future__ import annotations

import argparse
import sys
import time

from .store import contact_sheet, generate_world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="envlf world", description="Synthetic aerial scenes with captions and masks.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  envlf world generate --out world --n 1500 --seed 0")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write a demo world (Karpathy-layout dataset)")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--n", type=int, default=1500, help="number of scenes (default 1500)")
    g.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    g.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("scenes", help="georeferenced GeoTIFF scenes made of a world's tiles (for `index build`)")
    c.add_argument("--data", required=True, help="directory written by `generate`")
    c.add_argument("--out", required=True, help="folder for the .tif scenes")
    c.add_argument("--n", type=int, default=2, help="number of scenes (default 2)")
    c.add_argument("--grid", type=int, default=3, help="tiles per side of a scene (default 3)")
    c.add_argument("--dtype", default="uint8", choices=["uint8", "uint16"])
    s = sub.add_parser("sheet", help="contact sheet of a generated world")
    s.add_argument("--data", required=True, help="directory written by `generate`")
    s.add_argument("--out", default=None, help="PNG path (default DATA/contact_sheet.png)")
    s.add_argument("--n", type=int, default=16, help="tiles on the sheet (default 16)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "generate":
            t0 = time.perf_counter()
            out = generate_world(args.out, n=args.n, seed=args.seed, workers=args.workers,
                                 progress=not args.quiet)
            print(f"wrote {args.n} scenes to {out} in {time.perf_counter() - t0:.1f} s")
        elif args.cmd == "scenes":
            from envlf.data.geotiff import make_demo_scenes

            for f in make_demo_scenes(args.data, args.out, n_scenes=args.n, grid=args.grid, dtype=args.dtype):
                print(f)
        else:
            print(contact_sheet(args.data, n=args.n, out_png=args.out))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
