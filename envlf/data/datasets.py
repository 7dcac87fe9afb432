"""Datasets: every source layout read into one in-memory form, plus robust image loading.

Readers (``load_dataset(path)`` picks one from the layout):

- ``read_karpathy``  Karpathy JSON (RSICD, UCM-Captions, Sydney-Captions, the demo world);
- ``read_precomp``   AMFMN "precomp" text files (``{split}_filename.txt`` + ``{split}_caps.txt``);
- ``read_csv``       ``image,caption[,split][,class]``, one row per caption;
- ``read_folder``    a bare folder of images (search-only gallery, no captions).

All return a ``CaptionDataset`` of ``ImageRecord``s, so the trainer, evaluator, index and app
treat every source alike. Captions are cleaned the same way everywhere (``clean_caption``).

Images are never trusted: ``load_image`` turns anything Pillow can open into an RGB image or
raises a one-line ``ImageLoadError``; ``check_images`` drops unreadable records up front;
``ImageCaptionDataset`` (torch) returns None for an image that fails anyway and ``collate``
drops it, so one bad file never ends a run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from struct import (
    error as struct_error,  # some truncated headers raise it inside Pillow
)
from typing import Any, BinaryIO, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"})
SPLITS = ("train", "val", "test", "all")
# Largest image load_image decodes (width * height). 64 MP is an 8000 x 8000 scene: above any
# tile a retrieval model sees, far below the RAM a crafted "decompression bomb" would take.
DEFAULT_MAX_PIXELS = 64_000_000

# Split names some releases use, mapped to ours (the original name stays in meta["orig_split"]).
_SPLIT_ALIASES = {"restval": "train", "dev": "val", "valid": "val", "validation": "val"}


# -- the common form ----------------------------------------------------------------------------

@dataclass
class ImageRecord:
    image_id: str  # unique within the dataset, safe as a file name: no separators, no '..'
    path: Path  # absolute path to the image file (where it would be, for text-only corpora)
    split: str  # "train" | "val" | "test" | "all" (no split given)
    captions: list[str]  # cleaned (clean_caption); may be empty (bare image folder)
    label: str | None = None  # scene class when known
    # Anything else the source carries. Conventional keys: "filename" (as the source names the
    # image), "sentences" (one dict per caption, aligned with `captions`: the source's own
    # per-sentence keys, e.g. raw text, tokens, phrases), "orig_split".
    meta: dict = field(default_factory=dict)


@dataclass
class CaptionDataset:
    name: str
    root: Path
    records: list[ImageRecord]
    # False when the image files are not there (e.g. the RSICD/RSITMD caption files alone):
    # text-side work only. True when at least one image exists; check_images finds the rest.
    has_images: bool = True

    def __post_init__(self) -> None:
        dup = [k for k, n in Counter(r.image_id for r in self.records).items() if n > 1]
        if dup:
            raise ValueError(f"dataset {self.name!r}: duplicate image ids {dup[:5]}")

    # -- views ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def __iter__(self):
        return iter(self.records)

    def __repr__(self) -> str:
        splits = ", ".join(f"{s}={n}" for s, n in Counter(r.split for r in self.records).items())
        return (
            f"CaptionDataset(name={self.name!r}, images={len(self)}, captions={self.num_captions}, "
            f"splits=({splits}), has_images={self.has_images})"
        )

    def splits(self) -> list[str]:
        """Split names present, in first-appearance order."""
        return list(dict.fromkeys(r.split for r in self.records))

    def split(self, name: str) -> "CaptionDataset":
        """The records of one split; "all" is everything. Unknown split: ValueError."""
        if name == "all":
            return self
        if name not in self.splits():
            raise ValueError(
                f"dataset {self.name!r} has no {name!r} split (it has: {', '.join(self.splits()) or 'none'})"
            )
        return self.subset([i for i, r in enumerate(self.records) if r.split == name], suffix=name)

    def subset(self, indices: Iterable[int], suffix: str | None = None) -> "CaptionDataset":
        """A dataset of the given records (in that order); records are shared, not copied."""
        name = f"{self.name}/{suffix}" if suffix else self.name
        return replace(self, name=name, records=[self.records[i] for i in indices])

    @property
    def num_captions(self) -> int:
        return sum(len(r.captions) for r in self.records)

    def pairs(self) -> list[tuple[int, int]]:
        """(record index, caption index) for every caption, in record order."""
        return [(i, j) for i, r in enumerate(self.records) for j in range(len(r.captions))]

    def captions(self) -> list[str]:
        """All captions, flat, in ``pairs()`` order."""
        return [c for r in self.records for c in r.captions]

    def txt2img(self) -> np.ndarray:
        """(num_captions,) int64: caption (flat index) → record index. What metrics take."""
        return np.repeat(np.arange(len(self.records)), [len(r.captions) for r in self.records]).astype(np.int64)

    def labels(self) -> list[str | None]:
        return [r.label for r in self.records]

    def image_ids(self) -> list[str]:
        return [r.image_id for r in self.records]

    def paths(self) -> list[Path]:
        return [r.path for r in self.records]

    def index_of(self, image_id: str) -> int:
        for i, r in enumerate(self.records):
            if r.image_id == image_id:
                return i
        raise KeyError(f"no image {image_id!r} in dataset {self.name!r}")


# -- captions and ids ---------------------------------------------------------------------------

_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")


def clean_caption(text: str) -> str:
    """The one cleaned form of a caption, used by every reader.

    Strip, collapse every whitespace run to one space, and remove the space that tokenised
    releases put before punctuation: "There is a piece of farmland ." →
    "There is a piece of farmland.", "roads , trees" → "roads, trees". Case, spelling and
    everything else are kept; no full stop is added when there is none.
    """
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(str(text).split()))


def safe_id(relpath: str, keep_suffix: bool = False) -> str:
    """A deterministic id from a relative path: separators → "__", no '..', no odd characters.

    "sub/dir/a.png" → "sub__dir__a" ("sub__dir__a.png" with keep_suffix).
    """
    parts = [p for p in re.split(r"[\\/]+", str(relpath)) if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"cannot make an image id from {relpath!r}")
    if not keep_suffix:
        stem = Path(parts[-1]).stem
        parts[-1] = stem or parts[-1]
    parts = [re.sub(r"\.{2,}", ".", re.sub(r"[^\w.\-]", "_", p)).strip(".") or "_" for p in parts]
    return "__".join(parts)


def _assign_ids(relpaths: Sequence[str], source: str) -> list[str]:
    """Ids for images named by relative paths: the file stem where that is unique, else the
    path with separators replaced (with its suffix if still needed). Same path twice: error."""
    dup = [p for p, n in Counter(relpaths).items() if n > 1]
    if dup:
        raise ValueError(f"{source}: image listed more than once: {dup[:5]}")
    stems = Counter(safe_id(Path(p).name) for p in relpaths)
    ids = [safe_id(Path(p).name) if stems[safe_id(Path(p).name)] == 1 else safe_id(p) for p in relpaths]
    counts = Counter(ids)
    ids = [safe_id(p, keep_suffix=True) if counts[i] > 1 else i for p, i in zip(relpaths, ids)]
    dup = [i for i, n in Counter(ids).items() if n > 1]
    if dup:
        raise ValueError(f"{source}: cannot give these images distinct ids: {dup[:5]}")
    return ids


def _norm_split(split: Any, meta: dict) -> str:
    s = str(split).strip().lower() if split not in (None, "") else "all"
    if s in _SPLIT_ALIASES:
        meta["orig_split"] = s
        s = _SPLIT_ALIASES[s]
    return s


def _read_classes(path: Path) -> dict[str, str]:
    """classes.csv: filename,class → {filename: class}."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"filename", "class"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the columns 'filename,class', got {reader.fieldnames}")
        return {row["filename"].strip(): row["class"].strip() for row in reader if row["filename"]}


def _any_exists(paths: Iterable[Path]) -> bool:
    return any(p.is_file() for p in paths)


def _inside(base: Path, name: str, source: str) -> Path:
    """``base / name`` when it stays inside ``base`` (checked on the text, before any file
    is touched), else ValueError. Karpathy JSON and precomp lists name their images relative
    to the dataset folder; a name with ``..`` that climbs out of it, or an absolute one, would
    make the index (and the app, which serves the index's image folders) reach files outside
    the gallery. (A CSV may name absolute paths: it is the operator's explicit list.)"""
    p = Path(name)
    if p.is_absolute() or re.match(r"^[A-Za-z]:[\\/]", name):
        raise ValueError(f"{source}: image file name {name!r} is an absolute path; names are relative to "
                         "the dataset folder")
    depth = 0
    for part in re.split(r"[\\/]+", name):
        if part == "..":
            depth -= 1
        elif part not in ("", "."):
            depth += 1
        if depth < 0:
            raise ValueError(f"{source}: image file name {name!r} points outside the dataset folder")
    return base / p


# -- readers ------------------------------------------------------------------------------------

# long: a format reader: one check, each with its one-line error, per way the JSON can be wrong
def read_karpathy(
    path: str | Path,
    image_dir: str | Path | None = None,
    name: str | None = None,
    classes_csv: str | Path | None = None,
) -> CaptionDataset:
    """Karpathy-style JSON: ``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}``.

    ``path``: the JSON file, or a directory holding ``dataset.json`` (or one ``dataset*.json``).
    Images are looked up in ``image_dir`` when given, else ``root/images/`` (UCM layout), else
    ``root/<filepath>/<filename>`` (COCO style) or ``root/<filename>``. Class labels come from
    ``classes_csv`` (default: ``classes.csv`` beside the JSON, ``filename,class``) or from an
    image-level "class"/"label" key. Every other image key is kept in ``meta``; the sentence
    dicts are kept whole in ``meta["sentences"]``, aligned with ``captions``. A
    sentence that is empty after cleaning is dropped together with its meta entry.
    """
    path = Path(path)
    json_path = _find_karpathy_json(path) if path.is_dir() else path
    root = json_path.parent.resolve()
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {json_path}: {e}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{json_path}: expected a JSON object with an 'images' list (Karpathy layout)")

    classes_path = Path(classes_csv) if classes_csv else root / "classes.csv"
    classes = _read_classes(classes_path) if classes_path.is_file() else {}
    if classes_csv and not classes_path.is_file():
        raise ValueError(f"classes file not found: {classes_path}")
    img_dir = Path(image_dir).resolve() if image_dir else None
    default_dir = root / "images" if (root / "images").is_dir() else root

    rels, entries = [], []
    for n, im in enumerate(images):
        if not isinstance(im, dict) or not im.get("filename"):
            raise ValueError(f"{json_path}: images[{n}] has no 'filename'")
        rel = str(Path(str(im.get("filepath", ""))) / im["filename"]) if im.get("filepath") else str(im["filename"])
        for given in (str(im["filename"]), rel):
            _inside(root, given, f"{json_path}: images[{n}]")
        rels.append(rel)
        entries.append((rel, im))
    ids = _assign_ids(rels, str(json_path))

    records = []
    for image_id, (rel, im) in zip(ids, entries):
        fname = str(im["filename"])
        if img_dir is not None:
            p = img_dir / fname
        else:
            candidates = [root / "images" / fname, root / rel, root / fname]
            p = next((c for c in candidates if c.is_file()), default_dir / fname)
        meta = {k: v for k, v in im.items() if k not in ("split", "sentences", "class", "label")}
        captions, sentences = [], []
        for s in im.get("sentences") or []:
            raw = s.get("raw", "") if isinstance(s, dict) else s
            text = clean_caption(raw if isinstance(raw, str) else " ".join(s.get("tokens", [])))
            if text:
                captions.append(text)
                sentences.append(s if isinstance(s, dict) else {"raw": s})
        meta["sentences"] = sentences
        label = classes.get(fname, classes.get(rel, im.get("class", im.get("label"))))
        split = _norm_split(im.get("split"), meta)
        records.append(ImageRecord(image_id, p.resolve(), split, captions, None if label is None else str(label), meta))
    return CaptionDataset(
        name or str(data.get("dataset") or root.name), root, records, has_images=_any_exists(r.path for r in records)
    )


def _find_karpathy_json(d: Path) -> Path:
    if (d / "dataset.json").is_file():
        return d / "dataset.json"
    found = sorted(d.glob("dataset*.json"))
    if len(found) == 1:
        return found[0]
    raise ValueError(f"{d}: no dataset.json (Karpathy layout) found" + (f"; several candidates: {[f.name for f in found]}" if found else ""))


def _read_lines(path: Path) -> list[str]:
    """Lines of a text file (a final newline ends the last line; it adds no empty line)."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _strip_trailing_blank(lines: list[str]) -> list[str]:
    lines = list(lines)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _fits(nf: int, nc: int) -> bool:
    return nf == nc or (nf > 0 and nc % nf == 0)


# long: a format reader: one check, each with its one-line error, per way the folder can be wrong
def read_precomp(
    path: str | Path,
    image_dir: str | Path | None = None,
    name: str | None = None,
    splits: Sequence[str] | None = None,
) -> CaptionDataset:
    """AMFMN "precomp" text layout: ``{split}_filename.txt`` + ``{split}_caps.txt``, per split.

    Two line layouts exist side by side in the real RSICD / RSITMD files, told apart by the
    line counts: either the file-name list has one line per caption (``test_*``: the name
    repeats for each caption), or it lists each image once and the captions come k lines per
    image in the same order (``train_*``, k = 5). Anything else is an error. Captions are
    grouped per image in order of first appearance. A caption line that is empty keeps its
    place but is dropped (RSITMD train has four images whose five lines are all empty; they
    stay, with no captions).

    Images are optional: ``path`` of each record is ``image_dir / filename`` (default
    ``root/images`` if it exists, else ``root``) whether or not the file exists;
    ``has_images`` says whether any does.
    """
    root = Path(path).resolve()
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory (expected the precomp caption files)")
    found = sorted(
        (p.name[: -len("_caps.txt")] for p in root.glob("*_caps.txt")),
        key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s),  # train, val, test, others
    )
    if splits is not None:
        missing = [s for s in splits if s not in found]
        if missing:
            raise ValueError(f"{root}: no caption files for split(s) {missing} (found: {found})")
        found = list(splits)
    if not found:
        raise ValueError(f"{root}: no *_caps.txt files (precomp layout)")
    img_dir = Path(image_dir).resolve() if image_dir else (root / "images" if (root / "images").is_dir() else root)

    per_split: list[tuple[str, list[str], list[list[str]]]] = []
    for sp in found:
        fn_path, cap_path = root / f"{sp}_filename.txt", root / f"{sp}_caps.txt"
        if not fn_path.is_file():
            raise ValueError(f"{root}: {cap_path.name} has no matching {fn_path.name}")
        names = [n.strip() for n in _strip_trailing_blank(_read_lines(fn_path))]
        caps = _read_lines(cap_path)
        # Empty caption lines are positional (an image's caption may be blank), so trailing
        # blank lines are only dropped when the counts do not fit with them.
        if not _fits(len(names), len(caps)) and _fits(len(names), len(_strip_trailing_blank(caps))):
            caps = _strip_trailing_blank(caps)
        nf, nc = len(names), len(caps)
        if any(not n for n in names):
            raise ValueError(f"{fn_path}: empty file name on line {names.index('') + 1}")
        for i, n in enumerate(names):
            _inside(img_dir, n, f"{fn_path}:{i + 1}")
        if nf == nc:  # one line per caption
            pairs = list(zip(names, caps))
        elif nf and nc % nf == 0:  # each image once, k captions per image in order
            k = nc // nf
            pairs = [(names[i // k], c) for i, c in enumerate(caps)]
        else:
            raise ValueError(
                f"{root.name}/{sp}: {nf} file names but {nc} caption lines: expected one name per "
                f"caption line, or each name once with the same number of captions per image"
            )
        order: dict[str, list[str]] = {}
        for fname, cap in pairs:
            order.setdefault(fname, []).append(cap)
        per_split.append((sp, list(order), list(order.values())))

    all_names = [n for _, names, _ in per_split for n in names]
    ids = _assign_ids(all_names, str(root))
    records, n = [], 0
    for sp, names, caps in per_split:
        for fname, lines in zip(names, caps):
            meta: dict = {"filename": fname}
            captions = [c for c in (clean_caption(x) for x in lines) if c]
            if len(captions) != len(lines):
                meta["empty_caption_lines"] = len(lines) - len(captions)
            records.append(ImageRecord(ids[n], (img_dir / fname).resolve(), _norm_split(sp, meta), captions, None, meta))
            n += 1
    return CaptionDataset(name or root.name, root, records, has_images=_any_exists(r.path for r in records))


_IMAGE_COLS = ("image", "filename", "path")
_CAPTION_COLS = ("caption", "text")
_LABEL_COLS = ("class", "label")


# long: a format reader: one check, each with its one-line error, per way the CSV can be wrong
def read_csv(path: str | Path, image_dir: str | Path | None = None, name: str | None = None) -> CaptionDataset:
    """CSV ``image,caption`` with one row per caption (several rows per image allowed).

    Optional columns: ``split`` (default "all") and ``class`` (or ``label``). Header names are
    case-insensitive; "filename"/"path" also name the image column, "text" the caption.
    Relative image paths are relative to the CSV's directory (or ``image_dir``). An empty
    caption cell lists an image without a caption. Other columns are kept per caption in
    ``meta["sentences"]``. An image given two different splits or classes is an error.
    """
    path = Path(path).resolve()
    base = Path(image_dir).resolve() if image_dir else path.parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not rows:
        raise ValueError(f"{path}: empty CSV (expected a header 'image,caption')")
    header = [h.strip().lower() for h in rows[0]]

    def col(options: Sequence[str], required: bool) -> int | None:
        for o in options:
            if o in header:
                return header.index(o)
        if required:
            raise ValueError(f"{path}: no {options[0]!r} column (header: {rows[0]})")
        return None

    ci, cc = col(_IMAGE_COLS, True), col(_CAPTION_COLS, True)
    cs, cl = col(("split",), False), col(_LABEL_COLS, False)
    extra = [j for j in range(len(header)) if j not in (ci, cc, cs, cl)]

    groups: dict[str, dict] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        row = row + [""] * (len(header) - len(row))
        img = row[ci].strip()
        if not img:
            raise ValueError(f"{path}:{line}: empty image cell")
        g = groups.setdefault(img, {"captions": [], "sentences": [], "split": None, "label": None, "line": line})
        for key, j in (("split", cs), ("label", cl)):
            if j is None or not row[j].strip():
                continue
            v = row[j].strip()
            if g[key] is not None and g[key] != v:
                raise ValueError(f"{path}:{line}: image {img!r} has {key} {v!r} here but {g[key]!r} on line {g['line']}")
            g[key] = v
        text = clean_caption(row[cc])
        if text:
            g["captions"].append(text)
            g["sentences"].append({"raw": row[cc], **{header[j]: row[j] for j in extra}})

    names = list(groups)
    ids = _assign_ids([Path(n).as_posix() if not Path(n).is_absolute() else n for n in names], str(path))
    records = []
    for image_id, img in zip(ids, names):
        g = groups[img]
        meta: dict = {"filename": img, "sentences": g["sentences"]}
        p = Path(img) if Path(img).is_absolute() else base / img
        records.append(ImageRecord(image_id, p.resolve(), _norm_split(g["split"], meta), g["captions"], g["label"], meta))
    return CaptionDataset(name or path.stem, path.parent, records, has_images=_any_exists(r.path for r in records))


def read_folder(path: str | Path, name: str | None = None) -> CaptionDataset:
    """A folder of images, searched recursively, without captions (split "all").

    Image extensions only (``IMAGE_EXTENSIONS``, any case); hidden files and folders are
    skipped; sorted by relative path. Ids: the relative path without suffix, separators → "__"
    (suffix kept where two files differ only by it).
    """
    root = Path(path).resolve()
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    rels = [str(Path(f).with_suffix("")) for f in files]
    counts = Counter(rels)
    ids = [safe_id(f, keep_suffix=counts[r] > 1) for f, r in zip(files, rels)]
    dup = [i for i, n in Counter(ids).items() if n > 1]
    if dup:
        raise ValueError(f"{root}: cannot give these images distinct ids: {dup[:5]}")
    records = [ImageRecord(i, root / f, "all", [], None, {"filename": f}) for i, f in zip(ids, files)]
    return CaptionDataset(name or root.name, root, records, has_images=True)


def load_dataset(spec: str | Path, **kwargs) -> CaptionDataset:
    """Read a dataset, choosing the reader from the layout at ``spec``:

    a ``.json`` file or a directory with ``dataset.json`` → Karpathy; a directory with
    ``*_caps.txt`` → precomp; a ``.csv`` file → CSV; a directory of images → folder.
    Keyword arguments go to the reader (``image_dir``, ``name``, ...).
    """
    p = Path(spec).expanduser()
    if not p.exists():
        raise ValueError(f"dataset not found: {p}")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".json":
            return read_karpathy(p, **kwargs)
        if suffix == ".csv":
            return read_csv(p, **kwargs)
        raise ValueError(f"{p}: unknown dataset file type (expected .json or .csv)")
    if (p / "dataset.json").is_file() or len(list(p.glob("dataset*.json"))) == 1:
        return read_karpathy(p, **kwargs)
    if any(p.glob("*_caps.txt")):
        return read_precomp(p, **kwargs)
    try:
        return read_folder(p, **kwargs)
    except ValueError:
        raise ValueError(
            f"{p}: no dataset found (looked for dataset.json, *_caps.txt, or image files)"
        ) from None


# -- images -------------------------------------------------------------------------------------

class ImageLoadError(ValueError):
    """An image that cannot be used, with a one-line reason."""


_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def _describe(src) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return getattr(src, "name", None) or f"<{type(src).__name__}>"


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB (see load_image for the rules)."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        # palette with a transparent index: treat as alpha
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode == "RGB":
            return im
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode in _HIGH_DEPTH_MODES:
        # 16/32-bit single band: stretch the image's own min..max to 0..255. Remote-sensing
        # products rarely fill the 16-bit range (11- or 12-bit sensors), so a fixed /257
        # would give an almost black picture.
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageLoadError(f"array of shape {a.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageLoadError("float image array contains NaN or inf")
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    elif a.dtype == np.uint16 and a.ndim == 2:
        return Image.fromarray(a.astype(np.int32), "I")
    elif a.dtype == np.uint16:
        a = (a // 257).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageLoadError(f"unsupported image array dtype {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))


def _bomb_message(e: Exception, max_pixels: int | None) -> str:
    """Pillow refused a header that claims more than twice its MAX_IMAGE_PIXELS: say so in
    the words of our own limit ("900.0 MP exceeds the limit of 40.0 MP")."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    if m and max_pixels is not None:
        return f"{int(m.group(1)) / 1e6:.1f} MP exceeds the limit of {max_pixels / 1e6:.1f} MP"
    if m:
        return f"{int(m.group(1)) / 1e6:.1f} MP is too many pixels to decode safely"
    return "too many pixels to decode safely"


# long: one guard per way an image file can be bad (missing, huge, truncated, not an image,
# odd mode), each with its own message; the docstring lists them
def load_image(
    src: str | Path | bytes | bytearray | BinaryIO | Image.Image | np.ndarray,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Open an image from a path, bytes, a file object, a PIL image or an array → RGB PIL image.

    Raises ``ImageLoadError`` (a ValueError) with a one-line reason for a missing,
    unreadable, corrupt or truncated file, a non-image (e.g. text) with an image extension,
    an empty image, or one with more than ``max_pixels`` pixels (checked from the header,
    before anything is decoded; None: no limit of ours). Conversions:

    - animated (GIF, APNG, WebP): the first frame;
    - EXIF orientation is applied (phone uploads come out upright);
    - alpha (RGBA, LA, palette with transparency): composited over white, so transparent
      no-data areas look as they do on a white page;
    - greyscale, 1-bit, CMYK, YCbCr, palette: Pillow's conversion to RGB;
    - 16/32-bit single band: the image's own min..max stretched to 0..255.

    The result is fully decoded and holds no open file.
    """
    what = _describe(src)
    if isinstance(src, np.ndarray):
        src = _from_array(src)
    # (No warnings.catch_warnings here: it changes global state and is not thread-safe;
    # Pillow may warn about a big image before our own limit below refuses it.)
    try:
        if isinstance(src, Image.Image):
            handle, opened = src, False
        else:
            if isinstance(src, (bytes, bytearray, memoryview)):
                if len(src) == 0:
                    raise ImageLoadError(f"{what}: empty file (0 bytes), not an image")
                fp: Any = io.BytesIO(bytes(src))
            elif isinstance(src, (str, Path)):
                fp = Path(src)
                if not fp.is_file():
                    raise ImageLoadError(f"{what}: " + ("is a directory" if fp.is_dir() else "file not found"))
                if fp.stat().st_size == 0:
                    raise ImageLoadError(f"{what}: empty file (0 bytes), not an image")
            else:
                fp = src
            handle, opened = Image.open(fp), True
        try:
            im = handle
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageLoadError(f"{what}: empty image ({w}x{h})")
            if max_pixels is not None and w * h > max_pixels:
                raise ImageLoadError(
                    f"{what}: {w}x{h} = {w * h / 1e6:.1f} MP exceeds the limit of {max_pixels / 1e6:.1f} MP"
                )
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im) or im
            out = _to_rgb(im)
            if out is im:
                out = im.copy()  # detach from the file
            return out
        finally:
            if opened:
                handle.close()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{what}: {_bomb_message(e, max_pixels)}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{what}: not an image, or a format Pillow cannot read") from None
    except FileNotFoundError:
        raise ImageLoadError(f"{what}: file not found") from None
    except PermissionError:
        raise ImageLoadError(f"{what}: permission denied") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError, struct_error, ZeroDivisionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "truncated" if "truncated" in msg.lower() else "corrupt or unreadable"
        raise ImageLoadError(f"{what}: {kind} image ({msg})") from None


@dataclass
class ImageProblem:
    index: int  # record index in the dataset that was checked
    image_id: str
    path: Path
    message: str  # one line

    def __str__(self) -> str:
        return self.message


def check_images(
    dataset: CaptionDataset,
    max_workers: int = 2,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    decode: bool = True,
    progress: bool = False,
) -> tuple[CaptionDataset, list[ImageProblem]]:
    """Try every image; return (the dataset without the failures, the failures).

    ``decode=False`` only reads the headers (fast; misses truncated files). Runs
    ``max_workers`` threads (Pillow decodes outside the GIL). Failures are logged, never
    raised.
    """

    def check(i: int) -> ImageProblem | None:
        r = dataset.records[i]
        try:
            if decode:
                load_image(r.path, max_pixels=max_pixels)
            else:
                _check_header(r.path, max_pixels)
        except ImageLoadError as e:
            return ImageProblem(i, r.image_id, r.path, str(e))
        except Exception as e:  # noqa: BLE001 - a checker must never crash the run
            return ImageProblem(i, r.image_id, r.path, f"{r.path}: {type(e).__name__}: {e}")
        return None

    n = len(dataset.records)
    with ThreadPoolExecutor(max_workers=max(1, int(max_workers))) as pool:
        results: Iterable = pool.map(check, range(n))
        if progress:
            results = tqdm(results, total=n, desc=f"checking images of {dataset.name}", unit="img")
        problems = [p for p in results if p is not None]
    for p in problems:
        log.warning("skipping image %s: %s", p.image_id, p.message)
    bad = {p.index for p in problems}
    return dataset.subset([i for i in range(n) if i not in bad]), problems


def _check_header(path: Path, max_pixels: int | None) -> None:
    if not Path(path).is_file():
        raise ImageLoadError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{path}: {_bomb_message(e, max_pixels)}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image, or a format Pillow cannot read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{path}: corrupt or unreadable image ({e})") from None
    if max_pixels is not None and w * h > max_pixels:
        raise ImageLoadError(f"{path}: {w}x{h} = {w * h / 1e6:.1f} MP exceeds the limit of {max_pixels / 1e6:.1f} MP")


# -- torch --------------------------------------------------------------------------------------

class ImageCaptionDataset(torch.utils.data.Dataset):
    """Torch view of a CaptionDataset for training and encoding.

    mode "images": one item per record: {"image", "index", "image_id"} (encoding a gallery).
    mode "pairs":  one item per caption: {"image", "caption", "index", "caption_index",
                   "image_id"} (training).
    An image that cannot be loaded is logged once (per path, per worker process) and the
    item is None; ``collate`` drops it.
    """

    def __init__(
        self,
        dataset: CaptionDataset,
        transform: Callable | None = None,
        mode: str = "images",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if mode not in ("images", "pairs"):
            raise ValueError(f"mode must be 'images' or 'pairs', got {mode!r}")
        self.dataset = dataset
        self.transform = transform
        self.mode = mode
        self.max_pixels = max_pixels
        self.items = dataset.pairs() if mode == "pairs" else [(i, -1) for i in range(len(dataset))]
        self._bad: set[Path] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, n: int) -> dict | None:
        i, j = self.items[n]
        r = self.dataset.records[i]
        if r.path in self._bad:
            return None
        try:
            img = load_image(r.path, max_pixels=self.max_pixels)
        except ImageLoadError as e:
            self._bad.add(r.path)
            log.warning("skipping unreadable image %s: %s", r.image_id, e)
            return None
        item: dict = {"image": self.transform(img) if self.transform else img, "index": i, "image_id": r.image_id}
        if self.mode == "pairs":
            item["caption"] = r.captions[j]
            item["caption_index"] = j
        return item


def collate(batch: list[dict | None]) -> dict | None:
    """Drop the None items (unreadable images) and batch the rest.

    Tensors are stacked ("image": (B, 3, H, W)), ints become int64 tensors, everything else
    (captions, ids, PIL images) stays a list. A batch with nothing left is None.
    """
    items = [b for b in batch if b is not None]
    if not items:
        return None
    out: dict = {"dropped": len(batch) - len(items)}
    for key in items[0]:
        values = [b[key] for b in items]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, np.integer)) and not isinstance(values[0], bool):
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = values
    return out
