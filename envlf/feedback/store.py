"""Relevance-feedback store: the CSV file the app appends users' judgements to.

One row per judgement ("this result is / is not relevant to this query"), append-only,
safe when many users write at once (threads of one server process *and* several app
worker processes), readable by people in a spreadsheet and by fine-tuning through
`read_feedback`.

Schema (`COLUMNS`, in file order)
---------------------------------
==================== =====================================================================
time_utc             when the judgement was made, ISO 8601 UTC with ``Z``
                     (``2024-05-01T12:34:56.123456Z``); "latest judgement wins" uses it
annotator            Spaces login name, or an anonymous session id
direction            ``t2i`` (text query, image results) | ``i2t`` (image query, caption
                     results) | ``i2i`` (image query, image results)
query_text           the text query (t2i); empty otherwise
query_image_id       gallery/dataset id of the query image (i2t, i2i), if it has one
query_image_sha256   sha256 (hex) of the query image's bytes; uploads have only this
item_id              the judged result: image id (t2i, i2i) or caption id (i2t)
item_text            caption text (i2t), or the image as ``<dataset>:<relative path>`` (t2i,
                     i2i; ``GalleryIndex.item_ref``). Rows of earlier versions hold the
                     server's absolute path there; readers use ``item_id`` for images
rank                 1-based rank at which the result was shown
itc_score            dual-encoder (ITC) score; may be empty
itm_score            fusion-encoder (ITM) score; empty when re-ranking was off
label                ``relevant`` | ``not_relevant``
grade                optional graded relevance 0-3 (0 = not relevant, 1-3 = relevant,
                     so it must agree with ``label``); empty when not given
model_fingerprint    which checkpoint produced the ranking
index_fingerprint    which gallery index was searched
app_version          version of the app that wrote the row
lon, lat             WGS84 longitude / latitude of the judged image's centre when it is a chip of
                     a georeferenced scene (envlf.data.geotiff); empty otherwise. Files started
                     by earlier versions have no such columns (header version 1, see below)
row_id               uuid4 hex; readers de-duplicate on it. It is the *last* column and has a
                     fixed length, so a row cut short anywhere fails validation.
==================== =====================================================================

Header versions: the header line names the layout. Version 1 (`COLUMNS_V1`) is the above
without ``lon, lat``; version 2 (`COLUMNS`) adds them before ``row_id``. A new file gets
version 2. A file is never rewritten, so appending to a version-1 file keeps its layout (the
rows' places are left out, with a warning once per file: start a new file to keep them);
readers take both, and a version-1 row reads with empty lon/lat.

Writing (`FeedbackStore.append`)
--------------------------------
- Each call encodes all its rows first (validation failures raise `ValueError` before any
  byte is written) and then issues them as **one** ``os.write`` on a file descriptor opened
  with ``O_APPEND``, while holding an exclusive ``fcntl.flock`` (advisory, cross-process)
  and a per-path ``threading.Lock`` (in-process), then ``fsync``s (``fsync=False`` to skip).
  The lock is taken before the size check, so the header is written exactly once even when
  many processes create the file at the same moment. A failed write (disk full, interrupt)
  is rolled back to the previous size under the lock.
- Before writing, `append` checks the file ends with ``"\\n"``; if it does not, a writer was
  killed mid-row, and the torn tail is repaired first (see `repair`), so a new row is never
  glued onto a torn one. It also refuses to append to a file whose header is not ours.
- Encoding: plain UTF-8, **no byte-order mark**, lines end with ``"\\n"``. **Choice:** the
  readers of this file are mostly programs (pandas, the ``csv`` module, R, DuckDB, ``cut``,
  ``grep``, fine-tuning), and a BOM glues itself to the first column's name for every reader
  that does not expect one (``csv.DictReader(open(p, encoding="utf-8"))`` sees
  ``"\\ufefftime_utc"``). Excel opens it correctly through Data -> From Text/CSV (UTF-8);
  double-clicking it shows non-ASCII text garbled. ``FeedbackStore(path, bom=True)`` starts
  a file with a BOM for Excel users. Every reader here accepts both (files written by
  earlier versions start with one; `read_feedback` strips it; elsewhere read with
  ``encoding="utf-8-sig"``), and appending never adds a second one.
- Text fields are sanitised: NUL is removed; CR, LF, CRLF, other control characters and the
  Unicode line/paragraph separators become a space. **Choice:** free text is kept on one
  line (a caption's line breaks carry no meaning), so every record is exactly one physical
  line. That keeps the file friendly to ``wc -l``/``grep``/``tail`` and makes a torn write
  detectable from the last byte alone. (Tabs are kept.)
- Spreadsheet formula injection (OWASP "CSV injection"): a text field whose first character
  is ``=``, ``+``, ``-``, ``@``, tab or CR is written with a leading ``'``. To keep this
  reversible, a text field that already starts with ``'`` gets one too. Numeric fields
  (rank, scores, grade) are written as plain numbers and never escaped (``-0.25`` is a
  number to a spreadsheet, not a formula). **Readers strip the escape:** if a text field
  starts with ``'`` followed by one of ``= + - @ <tab> <CR> '``, the first ``'`` is removed;
  `read_feedback` does this.

Reading (`read_feedback`)
-------------------------
Returns ``(DataFrame, ReadReport)``. The report lists every skipped record with its file,
line and reason (wrong field count, bad label, bad direction, unparseable number, duplicate
row_id, torn last line, ...) and warnings (non-UTF-8 lines decoded as cp1252/latin-1,
extra columns). A file whose header lacks our columns raises
``ValueError("...: not an EnVLF feedback file: missing columns [...]")``.

Torn lines: a writer killed mid-row leaves a last line without ``"\\n"``. The reader ignores
it (unless it happens to be a complete, valid row, which is kept with a warning);
`repair` removes it for good, keeping the removed bytes in ``<file>.torn-<timestamp>``.

Locking is advisory: it protects writers that use this module (or ``flock``). It works on
local Linux/macOS file systems; on NFS, Linux emulates ``flock`` with byte-range locks.
On platforms without ``fcntl`` only the in-process lock applies.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import logging
import math
import numbers
import os
import re
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:  # POSIX only; see the module docstring for what is lost without it
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # pandas is imported lazily: writers (app workers) never need it
    import pandas as pd

logger = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = (
    "time_utc",
    "annotator",
    "direction",
    "query_text",
    "query_image_id",
    "query_image_sha256",
    "item_id",
    "item_text",
    "rank",
    "itc_score",
    "itm_score",
    "label",
    "grade",
    "model_fingerprint",
    "index_fingerprint",
    "app_version",
    "lon",
    "lat",
    "row_id",
)
PLACE_COLUMNS: tuple[str, ...] = ("lon", "lat")
COLUMNS_V1: tuple[str, ...] = tuple(c for c in COLUMNS if c not in PLACE_COLUMNS)  # header version 1
NUMERIC_COLUMNS: tuple[str, ...] = ("rank", "itc_score", "itm_score", "grade", "lon", "lat")
TEXT_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in NUMERIC_COLUMNS)
DIRECTIONS: tuple[str, ...] = ("t2i", "i2t", "i2i")
LABELS: tuple[str, ...] = ("relevant", "not_relevant")
GRADES = range(0, 4)
MAX_TEXT = 10_000  # characters per text field: a pasted novel must not bloat the file

BOM = "\ufeff"
HEADER_LINE = ",".join(COLUMNS) + "\n"
HEADER_LINE_V1 = ",".join(COLUMNS_V1) + "\n"
# First characters a spreadsheet may treat as the start of a formula (OWASP), plus the
# escape character itself so that the escaping stays reversible.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_ESCAPED_AFTER_QUOTE = FORMULA_TRIGGERS + ("'",)

_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
_HEX32_RE = re.compile(r"^[0-9a-f]{32}$")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# Control characters other than tab, DEL, C1 controls (NEL included), U+2028/U+2029.
_CONTROL_RE = re.compile("[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")


def utc_now_iso() -> str:
    """Current time as ISO 8601 UTC with microseconds and a ``Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(kw_only=True)
class FeedbackRow:
    """One judgement. Field meanings: see the module docstring (same order as `COLUMNS`)."""

    time_utc: str = field(default_factory=utc_now_iso)
    annotator: str
    direction: str
    query_text: str = ""
    query_image_id: str = ""
    query_image_sha256: str = ""
    item_id: str
    item_text: str = ""
    rank: int
    itc_score: float | None = None
    itm_score: float | None = None
    label: str
    grade: int | None = None
    model_fingerprint: str = ""
    index_fingerprint: str = ""
    app_version: str = ""
    lon: float | None = None
    lat: float | None = None
    row_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FeedbackRow:
        """Build from a dict (e.g. the app's handler); unknown keys are an error."""
        unknown = sorted(set(data) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown feedback fields {unknown}")
        try:
            return cls(**dict(data))
        except TypeError as e:  # missing required fields
            raise ValueError(str(e).replace("FeedbackRow.__init__() ", "")) from None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ValueError with a one-line reason when the row cannot be stored."""
        for name in TEXT_COLUMNS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {type(value).__name__}")
            if len(value) > MAX_TEXT:
                raise ValueError(f"{name} is longer than {MAX_TEXT} characters")
        if not _TIME_RE.match(self.time_utc):
            raise ValueError(f"bad time_utc {self.time_utc!r}: expected ISO 8601 UTC like 2024-05-01T12:34:56Z")
        try:
            datetime.fromisoformat(self.time_utc[:-1])
        except ValueError:
            raise ValueError(f"bad time_utc {self.time_utc!r}: not a real date/time") from None
        if not self.annotator.strip():
            raise ValueError("annotator is empty")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"bad direction {self.direction!r}: expected one of {', '.join(DIRECTIONS)}")
        if self.direction == "t2i":
            if not self.query_text.strip():
                raise ValueError("query_text is empty for a t2i judgement")
        elif not (self.query_image_id.strip() or self.query_image_sha256):
            raise ValueError(f"{self.direction} judgement needs query_image_id or query_image_sha256")
        if self.query_image_sha256 and not _SHA256_RE.match(self.query_image_sha256):
            raise ValueError(f"bad query_image_sha256 {self.query_image_sha256[:80]!r}: expected 64 hex digits")
        if not self.item_id.strip():
            raise ValueError("item_id is empty")
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"bad rank {self.rank!r}: expected an integer >= 1")
        for name in ("itc_score", "itm_score"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or not math.isfinite(value)):
                raise ValueError(f"bad {name} {value!r}: expected a finite number or None")
        if self.label not in LABELS:
            raise ValueError(f"bad label {self.label!r}: expected one of {', '.join(LABELS)}")
        if self.grade is not None:
            if not _is_int(self.grade) or self.grade not in GRADES:
                raise ValueError(f"bad grade {self.grade!r}: expected an integer 0-3 or None")
            if (self.grade > 0) != (self.label == "relevant"):
                raise ValueError(f"grade {self.grade} contradicts label {self.label!r} "
                                 "(0 = not relevant, 1-3 = relevant)")
        if (self.lon is None) != (self.lat is None):
            raise ValueError("lon and lat come together: give both or neither")
        for name, bound in (("lon", 180.0), ("lat", 90.0)):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or not math.isfinite(value) or abs(value) > bound):
                raise ValueError(f"bad {name} {value!r}: expected degrees within +-{bound:g} (WGS84) or None")
        if not _HEX32_RE.match(self.row_id):
            raise ValueError(f"bad row_id {self.row_id[:80]!r}: expected 32 lowercase hex digits (uuid4().hex)")


# --------------------------------------------------------------------------- encoding


def sanitize_text(value: str) -> str:
    """Remove NUL, turn line breaks and other control characters into spaces."""
    value = value.replace("\x00", "").replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    return _CONTROL_RE.sub(" ", value)


def escape_formula(value: str) -> str:
    """Prefix ``'`` where a spreadsheet could read the field as a formula (reversible)."""
    return "'" + value if value.startswith(_ESCAPED_AFTER_QUOTE) else value


def unescape_formula(value: str) -> str:
    """Inverse of `escape_formula`: what readers of the CSV apply to text fields."""
    if len(value) >= 2 and value[0] == "'" and value[1] in _ESCAPED_AFTER_QUOTE:
        return value[1:]
    return value


def _format_number(value: Any) -> str:
    if value is None:
        return ""
    if _is_int(value):
        return str(int(value))
    return repr(float(value))  # shortest text that round-trips


def _encode_fields(row: FeedbackRow, columns: Sequence[str] = COLUMNS) -> list[str]:
    out = []
    for name in columns:
        value = getattr(row, name)
        if name in NUMERIC_COLUMNS:
            out.append(_format_number(value))
        else:
            if name == "query_image_sha256":
                value = value.lower()
            out.append(escape_formula(sanitize_text(value)))
    return out


RowLike = FeedbackRow | Mapping[str, Any]


def _coerce_rows(rows: RowLike | Iterable[RowLike]) -> list[FeedbackRow]:
    if isinstance(rows, (FeedbackRow, Mapping)):
        rows = [rows]
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            try:
                row = FeedbackRow.from_mapping(row)
            except ValueError as e:
                raise ValueError(f"row {i}: {e}") from None
        if not isinstance(row, FeedbackRow):
            raise ValueError(f"row {i}: expected a FeedbackRow or a dict, got {type(row).__name__}")
        out.append(row)
    return out


def encode_rows(rows: Sequence[FeedbackRow], columns: Sequence[str] = COLUMNS) -> bytes:
    """Validate and serialise rows to UTF-8 CSV bytes (no header) in the layout `columns`
    (`COLUMNS`, or `COLUMNS_V1` for a file of header version 1). Raises ValueError."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for i, row in enumerate(rows):
        try:
            row.validate()
        except ValueError as e:
            raise ValueError(f"row {i}: {e}") from None
        writer.writerow(_encode_fields(row, columns))
    return buf.getvalue().encode("utf-8")


# --------------------------------------------------------------------------- locking

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _reset_thread_locks() -> None:  # a forked child must not inherit locks held by other threads
    global _THREAD_LOCKS_GUARD
    _THREAD_LOCKS.clear()
    _THREAD_LOCKS_GUARD = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_thread_locks)


def _thread_lock(path: Path) -> threading.Lock:
    key = os.path.realpath(path)
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(key, threading.Lock())


@contextlib.contextmanager
def _locked_fd(path: Path) -> Iterator[int]:
    """Open ``path`` (created if missing) O_RDWR|O_APPEND and hold both locks on it.

    The file is re-opened if it was renamed or removed while we waited for the lock
    (log rotation), so we never write into an unlinked file.
    """
    path = Path(path)
    with _thread_lock(path):
        while True:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                try:
                    current = os.stat(path)
                except FileNotFoundError:
                    current = None
                if current is not None and (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):
                    yield fd
                    return
            finally:
                # Unlock explicitly: a child forked meanwhile may hold a copy of fd, and the
                # lock would otherwise live as long as that copy.
                if fcntl is not None:
                    with contextlib.suppress(OSError):
                        fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


# --------------------------------------------------------------------------- torn tails


@dataclass
class TailRepair:
    """What `repair` did to the end of a file."""

    action: str  # "none" | "truncated" (torn bytes removed) | "terminated" (missing "\n" added)
    removed_bytes: int = 0
    copy: Path | None = None  # where the removed bytes were saved

    def __str__(self) -> str:
        if self.action == "truncated":
            return f"removed a torn last line ({self.removed_bytes} bytes, saved to {self.copy})"
        if self.action == "terminated":
            return "the last row was complete but lacked a newline: added one"
        return "nothing to repair"


def _last_newline(fd: int, size: int, chunk: int = 65536) -> int:
    """Offset of the last b"\\n" in the file, -1 when there is none."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        pos = os.pread(fd, end - start, start).rfind(b"\n")
        if pos >= 0:
            return start + pos
        end = start
    return -1


def _tail_is_complete_row(tail: bytes, columns: Sequence[str]) -> bool:
    try:
        text = tail.decode("utf-8")
    except UnicodeDecodeError:
        return False
    try:
        records = list(csv.reader([text], strict=True))
    except csv.Error:
        return False
    if len(records) != 1 or len(records[0]) != len(columns):
        return False
    try:
        _row_from_strings(dict(zip(columns, records[0])))
    except ValueError:
        return False
    return True


def _check_header(fd: int, path: Path) -> tuple[str, ...]:
    """The file's layout (`COLUMNS` or `COLUMNS_V1`); refuses a file that is not ours (a torn
    header of ours is accepted: repair removes it, and the file starts anew as version 2)."""
    raw = os.pread(fd, len(BOM.encode()) + len(HEADER_LINE) + 1, 0)
    if BOM.encode().startswith(raw):
        return COLUMNS  # killed after writing part of the byte-order mark
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # read_feedback reads it; appending UTF-8 would mix encodings
        raise ValueError(f"{path}: UTF-16 text (a spreadsheet's 'Unicode text' export?); refusing to append UTF-8 "
                         "rows to it: convert it to UTF-8 first (iconv -f UTF-16 -t UTF-8)")
    head = raw.removeprefix(BOM.encode())
    for columns, line in ((COLUMNS, HEADER_LINE), (COLUMNS_V1, HEADER_LINE_V1)):
        expected = line.encode()
        if head.startswith(expected) or head.startswith(expected[:-1] + b"\r\n"):
            return columns
    if b"\n" not in head and HEADER_LINE.encode().startswith(head):
        return COLUMNS  # killed while creating the file: repair will remove it
    first = head.split(b"\n", 1)[0][:120].decode("utf-8", "replace")
    raise ValueError(f"{path}: not an EnVLF feedback file (header {first!r}); refusing to modify it")


def _repair_locked(fd: int, path: Path) -> TailRepair:
    size = os.fstat(fd).st_size
    if size == 0:
        return TailRepair("none")
    columns = _check_header(fd, path)
    if os.pread(fd, 1, size - 1) == b"\n":
        return TailRepair("none")
    cut = _last_newline(fd, size) + 1
    tail = os.pread(fd, size - cut, cut)
    if cut > 0 and _tail_is_complete_row(tail, columns):
        os.write(fd, b"\n")
        os.fsync(fd)
        return TailRepair("terminated")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    copy = path.with_name(f"{path.name}.torn-{stamp}")
    n = 0
    while copy.exists():
        n += 1
        copy = path.with_name(f"{path.name}.torn-{stamp}-{n}")
    with open(copy, "xb") as f:
        f.write(tail)
        f.flush()
        os.fsync(f.fileno())
    os.ftruncate(fd, cut)
    os.fsync(fd)
    logger.warning("%s: %s", path, TailRepair("truncated", len(tail), copy))
    return TailRepair("truncated", len(tail), copy)


def repair(path: str | os.PathLike) -> TailRepair:
    """Remove a torn last line (a writer killed mid-row), under the writers' lock.

    The removed bytes are kept in ``<path>.torn-<UTC timestamp>``. A last line that is a
    complete, valid row missing only its newline gets the newline instead. A missing file
    is left missing.
    """
    path = Path(path)
    if not path.exists():
        return TailRepair("none")
    with _locked_fd(path) as fd:
        return _repair_locked(fd, path)


# --------------------------------------------------------------------------- the store


_WARNED_V1: set[str] = set()


class FeedbackStore:
    """Append-only CSV of judgements, safe for concurrent threads and processes.

    ``fsync=True`` makes each append durable before it returns (about a millisecond on a
    local SSD); ``bom=True`` starts a new file with a UTF-8 byte-order mark, for Excel's
    double-click (see "Encoding" above: plain UTF-8 is the default).
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True, bom: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.bom = bom

    def __repr__(self) -> str:
        return f"FeedbackStore({str(self.path)!r}, fsync={self.fsync})"

    def append(self, rows: RowLike | Iterable[RowLike]) -> list[str]:
        """Append one row or several (dicts are accepted); returns their row_ids.

        All rows are validated first: if one is invalid, ValueError names it and nothing is
        written. The rows then go to the file in one write under the locks.
        """
        rows = _coerce_rows(rows)
        if not rows:
            return []
        payload = encode_rows(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked_fd(self.path) as fd:
            _repair_locked(fd, self.path)  # checks the header; never glue a row onto a torn one
            size = os.fstat(fd).st_size  # checked under the lock: one header, ever
            if size == 0:
                payload = ((BOM if self.bom else "") + HEADER_LINE).encode() + payload
            elif _check_header(fd, self.path) == COLUMNS_V1:
                payload = encode_rows(rows, COLUMNS_V1)
                if any(r.lon is not None for r in rows) and str(self.path) not in _WARNED_V1:
                    _WARNED_V1.add(str(self.path))
                    logger.warning("%s has a header of version 1 (no lon, lat): the judged chips' places are "
                                   "not recorded in it; start a new feedback file to keep them", self.path)
            try:
                written = os.write(fd, payload)
                while written < len(payload):  # a short write is rare (signals, quotas)
                    written += os.write(fd, payload[written:])
                if self.fsync:
                    os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):  # roll back a partial write
                    os.ftruncate(fd, size)
                raise
        if size == 0 and self.fsync:
            _fsync_dir(self.path.parent)
        return [r.row_id for r in rows]

    def read(self) -> tuple[pd.DataFrame, ReadReport]:
        return read_feedback(self.path)

    def repair(self) -> TailRepair:
        return repair(self.path)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere; best effort
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- reading


@dataclass
class SkippedRecord:
    path: str
    line: int  # first physical line of the record, 1-based
    reason: str
    end_line: int | None = None  # last line when the record spans several

    def __str__(self) -> str:
        where = f"{self.line}-{self.end_line}" if self.end_line and self.end_line != self.line else f"{self.line}"
        return f"{self.path}:{where}: {self.reason}"


@dataclass
class ReadReport:
    """What `read_feedback` kept, skipped (and why) and warned about."""

    files: list[str] = field(default_factory=list)
    rows: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    encodings: dict[str, str] = field(default_factory=dict)  # file -> encoding(s) used

    @property
    def duplicates(self) -> int:
        return sum(s.reason.startswith("duplicate row_id") for s in self.skipped)

    @property
    def torn(self) -> list[SkippedRecord]:
        return [s for s in self.skipped if s.reason.startswith("torn last line")]

    @property
    def clean(self) -> bool:
        return not self.skipped and not self.warnings

    def __str__(self) -> str:
        lines = [f"read {self.rows} rows from {len(self.files)} file(s); skipped {len(self.skipped)}"
                 + (f" ({self.duplicates} duplicate row_ids)" if self.duplicates else "")]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"skipped {s}" for s in self.skipped]
        return "\n".join(lines)


def _parse_int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)  # a spreadsheet may have re-saved 3 as 3.0
    except ValueError:
        raise ValueError(f"unparseable {name} {text[:40]!r}") from None
    if not value.is_integer():
        raise ValueError(f"unparseable {name} {text[:40]!r}: not an integer")
    return int(value)


def _parse_float(text: str, name: str) -> float | None:
    if text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"unparseable {name} {text[:40]!r}") from None


def _row_from_strings(values: Mapping[str, str]) -> FeedbackRow:
    """Parse one CSV record (already mapped to column names); ValueError with the reason."""
    kw: dict[str, Any] = {c: unescape_formula(values[c]) for c in TEXT_COLUMNS}
    kw["rank"] = _parse_int(values["rank"].strip(), "rank")
    kw["itc_score"] = _parse_float(values["itc_score"], "itc_score")
    kw["itm_score"] = _parse_float(values["itm_score"], "itm_score")
    grade = values["grade"].strip()
    kw["grade"] = None if grade == "" else _parse_int(grade, "grade")
    for name in PLACE_COLUMNS:  # absent from files of header version 1
        kw[name] = _parse_float(values.get(name, ""), name)
    row = FeedbackRow(**kw)
    row.validate()
    return row


def _decode_lines(raw_lines: list[bytes], path: str, report: ReadReport) -> list[str]:
    """Decode line by line: UTF-8, else cp1252, else latin-1 (never fails), with warnings.

    Per line, so one line pasted in from a cp1252 tool does not garble the UTF-8 rest.
    """
    out, fallback = [], {"cp1252": [], "latin-1": []}
    for i, raw in enumerate(raw_lines, 1):
        try:
            out.append(raw.decode("utf-8"))
            continue
        except UnicodeDecodeError:
            pass
        try:
            out.append(raw.decode("cp1252"))
            fallback["cp1252"].append(i)
        except UnicodeDecodeError:
            out.append(raw.decode("latin-1"))
            fallback["latin-1"].append(i)
    used = ["utf-8"] if len(fallback["cp1252"]) + len(fallback["latin-1"]) < len(raw_lines) else []
    for enc, nums in fallback.items():
        if nums:
            used.append(enc)
            shown = ", ".join(map(str, nums[:10])) + (", ..." if len(nums) > 10 else "")
            report.warnings.append(f"{path}: {len(nums)} line(s) are not UTF-8, decoded as {enc} "
                                   f"(lines {shown}); check their non-ASCII text")
    report.encodings[path] = "+".join(used) or "utf-8"
    return out


def snapshot(path: Path) -> bytes:
    """The whole file read under a shared lock (writers hold the exclusive one), so an append
    in progress is never seen half-done: what the app hands out as a download."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)  # releases the lock


def _csv_records(line_texts: list[str], first_line: int) -> Iterator[tuple[int, int, list[str] | None, str]]:
    """(start line, end line, fields or None, csv error) for each record."""
    reader = csv.reader(iter(t + "\n" for t in line_texts), strict=True)
    while True:
        start = reader.line_num + first_line
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, reader.line_num + first_line - 1, None, f"malformed CSV ({e})"
            continue
        yield start, reader.line_num + first_line - 1, fields, ""


def _split_lines(data: bytes, name: str, report: ReadReport) -> tuple[list[str], int, bytes | None]:
    """The file's bytes -> (decoded complete lines, their count, the torn last line or None):
    UTF-16 converted, a byte-order mark dropped, a last line without newline set aside."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        report.warnings.append(f"{name}: UTF-16 file (a spreadsheet's 'Unicode text' export?), converted")
        data = data.decode("utf-16", "replace").encode("utf-8")
    raw_lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    torn = None
    if raw_lines[-1] == b"":
        raw_lines.pop()
    else:
        torn = raw_lines.pop()  # no trailing newline: possibly a writer killed mid-row
    return _decode_lines(raw_lines, name, report), len(raw_lines), torn


def _header(records: Iterator, name: str, report: ReadReport) -> list[str] | None:
    """The header of the records (consumed from the iterator), checked; None for an empty file."""
    for _start, _end, fields, error in records:
        if fields == []:
            continue
        if fields is None:
            raise ValueError(f"{name}: not an EnVLF feedback file: unreadable header ({error})")
        header = [f.strip() for f in fields]
        missing = [c for c in COLUMNS_V1 if c not in header]  # lon, lat: from version 2 on
        if missing:
            raise ValueError(f"{name}: not an EnVLF feedback file: missing columns {missing}")
        if len(set(header)) != len(header):
            raise ValueError(f"{name}: not an EnVLF feedback file: repeated column names in the header")
        extra = [c for c in header if c not in COLUMNS]
        if extra:
            report.warnings.append(f"{name}: extra columns ignored: {extra}")
        return header
    return None


class _Rows:
    """The rows kept from one file; calling it with a record keeps it or says why not."""

    def __init__(self, name: str, header: list[str], seen: dict[str, str]):
        self.name, self.header, self.seen, self.rows = name, header, seen, []

    def __call__(self, start: int, end: int, fields: list[str]) -> str | None:
        if fields == self.header:
            return "repeated header (files concatenated?)"
        if len(fields) != len(self.header):
            return f"{len(fields)} fields, expected {len(self.header)}"
        try:
            row = _row_from_strings(dict(zip(self.header, fields)))
        except ValueError as e:
            return str(e)
        if row.row_id in self.seen:
            return f"duplicate row_id {row.row_id} (kept the one at {self.seen[row.row_id]})"
        self.seen[row.row_id] = f"{self.name}:{start}"
        self.rows.append(row.as_dict())
        return None


def _shape_error(reason: str) -> bool:
    return reason.startswith("malformed CSV") or " fields, expected " in reason


def _torn_line(torn: bytes, line_no: int, take: _Rows, report: ReadReport) -> None:
    """A last line without newline: kept when it is a complete row, else skipped and reported."""
    name = take.name
    text = _decode_lines([torn], name + " (last line)", ReadReport())[0]
    try:
        fields = next(csv.reader([text], strict=True), None)
    except csv.Error:
        fields = None
    if fields is not None and len(fields) == len(take.header) and take(line_no, line_no, fields) is None:
        report.warnings.append(f"{name}:{line_no}: last line lacks a newline but is a complete row: kept")
        return
    report.skipped.append(SkippedRecord(
        name, line_no, "torn last line (no trailing newline: a writer was interrupted mid-row): ignored"))
    report.warnings.append(f"{name}:{line_no}: torn last line ignored; "
                           "envlf.feedback.store.repair(path) removes it (the next append does too)")


def _read_records(path: Path, report: ReadReport, seen: dict[str, str]) -> list[dict[str, Any]]:
    name = str(path)
    lines, n_lines, torn = _split_lines(snapshot(path), name, report)
    it = _csv_records(lines, 1)
    header = _header(it, name, report)
    if header is None:
        if torn is not None:
            report.skipped.append(SkippedRecord(name, n_lines + 1, "torn last line (the header itself): ignored"))
        report.warnings.append(f"{name}: empty file")
        return []
    take = _Rows(name, header, seen)
    for start, end, fields, error in it:
        if fields == []:
            continue
        reason = error or take(start, end, fields)
        if reason is None:
            continue
        if end > start and _shape_error(reason):
            # One bad quote can swallow the lines after it into one record. Our writer never
            # puts a newline inside a field, so retry those lines one by one.
            for n in range(start, end + 1):
                for s_, e, f, err in _csv_records([lines[n - 1]], n):
                    if f == []:
                        continue
                    r = err or take(s_, e, f)
                    if r is not None:
                        report.skipped.append(SkippedRecord(name, s_, r, e))
            continue
        report.skipped.append(SkippedRecord(name, start, reason, end))
    if torn is not None:
        _torn_line(torn, n_lines + 1, take, report)
    return take.rows


def empty_frame() -> pd.DataFrame:
    return _to_frame([])


def _to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for c in TEXT_COLUMNS:
        df[c] = df[c].astype(object)
    df["time_utc"] = pd.to_datetime(df["time_utc"], utc=True, format="ISO8601")
    df["rank"] = df["rank"].astype("int64")
    df["itc_score"] = pd.to_numeric(df["itc_score"]).astype("float64")
    df["itm_score"] = pd.to_numeric(df["itm_score"]).astype("float64")
    df["grade"] = pd.array([r["grade"] for r in rows], dtype="Int64")
    for c in PLACE_COLUMNS:
        df[c] = pd.to_numeric(df[c]).astype("float64")
    return df


def read_feedback(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[pd.DataFrame, ReadReport]:
    """Read one or several feedback CSVs into one DataFrame (columns = `COLUMNS`).

    Types: ``time_utc`` tz-aware UTC datetimes, ``rank`` int64, scores float64 (NaN when
    empty), ``grade`` nullable Int64, text columns str ("" when empty). Rows keep file order;
    a row_id seen before (in any of the files) is skipped as a duplicate. Raises ValueError
    for a file that is not an EnVLF feedback file, FileNotFoundError for a missing one.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = ReadReport()
    seen: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for p in paths:
        report.files.append(str(p))
        rows += _read_records(Path(p), report, seen)
    report.rows = len(rows)
    return _to_frame(rows), report


# --------------------------------------------------------------------------- queries


def query_key(direction: str, query_text: str = "", query_image_id: str = "", query_image_sha256: str = "") -> str:
    """What identifies a query: the text (whitespace collapsed) for t2i, otherwise
    ``image:<query_image_id>`` or, for uploads without an id, ``image:sha256:<hex>``."""
    if direction == "t2i":
        return " ".join(str(query_text).split())
    if query_image_id:
        return f"image:{query_image_id}"
    return f"image:sha256:{str(query_image_sha256).lower()}"


def query_id(direction: str, key: str) -> str:
    """Stable query id: ``"q" + sha1(direction + TAB + key)[:12]``."""
    return "q" + hashlib.sha1(f"{direction}\t{key}".encode("utf-8")).hexdigest()[:12]


def with_queries(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``df`` with ``query`` (see `query_key`) and ``qid`` (see `query_id`) columns."""
    out = df.copy()
    out["query"] = [query_key(d, t, i, s) for d, t, i, s in zip(
        out["direction"], out["query_text"], out["query_image_id"], out["query_image_sha256"])]
    out["qid"] = [query_id(d, k) for d, k in zip(out["direction"], out["query"])]
    return out


def latest_judgements(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (query, item): the latest judgement wins.

    "Latest" is the greatest ``time_utc``; equal times fall back to input order (later
    row wins). The result has the ``query`` and ``qid`` columns of `with_queries` and a
    ``rel`` column: the grade when given, else 1 (relevant) / 0 (not relevant).
    """
    out = with_queries(df)
    out["_order"] = range(len(out))
    out = out.sort_values(["time_utc", "_order"], kind="stable")
    out = out.drop_duplicates(["direction", "qid", "item_id"], keep="last")
    out = out.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    from_label = (out["label"] == "relevant").astype("int64")
    out["rel"] = out["grade"].astype("Int64").fillna(from_label).astype("int64")
    return out


# --------------------------------------------------------------------------- dashboard stats

PRECISION_KS = (1, 5, 10)


def summary(df: pd.DataFrame, ks: Sequence[int] = PRECISION_KS) -> dict[str, Any]:
    """Tables for the app's dashboard (pure pandas, no plotting).

    Keys:
    - ``total``: number of judgements (rows);
    - ``per_label``: Series, judgements per label (both labels always present);
    - ``per_annotator``: DataFrame indexed by annotator: ``relevant``, ``not_relevant``, ``total``;
    - ``per_query``: DataFrame indexed by qid: ``direction``, ``query``, judgement counts
      per label and ``total``, plus ``p@k`` for each k;
    - ``per_day`` / ``per_hour``: DataFrames indexed by UTC day / hour (timeline), a column per label;
    - ``precision_at_k``: Series, the mean of ``p@k`` over queries that have any judged
      result at rank <= k;
    - ``judged_at_k``: Series (same index), how many judged results (latest per pair) have
      rank <= k — what each precision figure rests on.

    "Precision@k as judged" of a query = share of ``relevant`` among its *judged* results
    with rank <= k (NaN when none were judged). It counts the latest judgement per
    (query, item) only (`latest_judgements`), so a re-judged item counts once.
    """
    import pandas as pd

    labels = list(LABELS)

    def by(keys: Any, frame: pd.DataFrame, name: str) -> pd.DataFrame:
        """Label counts per key: one row per key, a column per label (zeros filled)."""
        table = pd.crosstab(keys, frame["label"]) if len(frame) else pd.DataFrame()
        table = table.reindex(columns=labels, fill_value=0).astype("int64")
        table.index.name, table.columns.name = name, None
        return table

    q = with_queries(df)
    per_label = df["label"].value_counts().reindex(labels, fill_value=0).astype("int64")
    per_label.name, per_label.index.name = "count", "label"
    per_annotator = by(df["annotator"], df, "annotator")
    per_annotator["total"] = per_annotator[labels].sum(axis=1)
    meta = q.drop_duplicates("qid").set_index("qid")[["direction", "query"]]
    per_query = meta.join(by(q["qid"], q, "qid"))
    per_query[labels] = per_query[labels].fillna(0).astype("int64")
    per_query["total"] = per_query[labels].sum(axis=1)
    latest = latest_judgements(df)
    latest["_rel"] = (latest["label"] == "relevant").astype("float64")
    for k in ks:
        prec = latest[latest["rank"] <= k].groupby("qid")["_rel"].mean()
        per_query[f"p@{k}"] = prec.reindex(per_query.index).astype("float64")
    precision = pd.Series({f"p@{k}": per_query[f"p@{k}"].mean() for k in ks}, dtype="float64")
    judged = pd.Series({f"p@{k}": int((latest["rank"] <= k).sum()) for k in ks}, dtype="int64")
    per_day = by(df["time_utc"].dt.floor("D"), df, "day")
    per_hour = by(df["time_utc"].dt.floor("h"), df, "hour")
    return {
        "total": int(len(df)),
        "per_label": per_label,
        "per_annotator": per_annotator,
        "per_query": per_query,
        "per_day": per_day,
        "per_hour": per_hour,
        "precision_at_k": precision,
        "judged_at_k": judged,
    }
