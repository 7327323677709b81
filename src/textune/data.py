"""Read labelled files, map labels, split, tokenize, and batch by length.

Everything the user can get wrong here raises :class:`UserError` with the file, row or flag
and the fix.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import NO_WINDOWS_FOR_PAIRS, TRUNCATIONS, DataArgs
from .errors import UserError

log = logging.getLogger(__name__)

TEXT_NAMES = ("text", "texts", "sentence", "sentence1", "review", "content", "document", "body",
              "comment", "tweet", "utterance", "message", "query", "question", "abstract", "title")
LABEL_NAMES = ("label", "labels", "class", "category", "sentiment", "target", "y", "intent",
               "topic", "polarity", "gold_label", "tag", "tags", "topics", "categories")
PAIR_NAMES = ("text_pair", "sentence2", "pair", "hypothesis", "context")


@dataclass
class Table:
    """Parsed rows of a labelled (or unlabelled) file."""

    texts: list[str]
    labels: list[str] | list[tuple[str, ...]] | None
    """One label a row, or (multi-label) a sorted tuple of tags a row, empty for none."""
    pairs: list[str] | None
    source: str
    label_sep: str | None = None
    """The separator the multi-label column's tags were split on (None: lists or 0/1 columns)."""
    rows: list[int] | None = None
    """Each row's place in its file (0-based data rows, header excluded), where it came from
    one: rows with an empty text or no label were dropped, so these can skip numbers."""
    text_col: str | None = None
    """The column the texts were read from (inputs to predict)."""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def multi_label(self) -> bool:
        return self.labels is not None and is_tag_lists(self.labels)

    def keys(self) -> list[tuple[str, str | None]]:
        """Each row's ``same_text`` key: what makes two rows the same text."""
        return [same_text(t, p) for t, p in zip(self.texts, self.pairs or [None] * len(self))]

    def subset(self, idx) -> Table:
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Table(pick(self.texts), pick(self.labels), pick(self.pairs), self.source,
                     self.label_sep, pick(self.rows))


def same_text(text: str, pair: str | None = None) -> tuple[str, str | None]:
    """What makes two rows the same text: case and spacing aside."""
    return " ".join(text.lower().split()), None if pair is None else " ".join(pair.lower().split())


def frame_file(df, name: str = "data") -> str:
    """A pandas DataFrame given from Python (``textune.fit(df, ...)``) as a JSON-lines file in
    ``$TEXTUNE_HOME/frames``, named by its content: the run's config points at a file, so the
    run reloads, re-evaluates and is compared like one made from a file. Lists in a cell (tags)
    and numbers keep their types; the index is not kept (rows are numbered by position)."""
    import hashlib

    from . import hub

    if len(df) == 0:
        raise UserError(f"{name}=: the DataFrame has no rows")
    text = df.to_json(orient="records", lines=True, force_ascii=False, date_format="iso")
    path = hub.home() / "frames" / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return str(path)


def resolve_data(spec: str | Path) -> Path:
    """A catalog dataset name or a path to a file -> a local file."""
    from . import hub

    s = str(spec)
    if s in hub.CATALOG and hub.CATALOG[s].kind == "dataset":
        return hub.fetch(s) / "data.csv"
    p = Path(s).expanduser()
    if not p.exists():
        names = ", ".join(hub.catalog_names("dataset"))
        raise UserError(f"--data {s}: no such file, and not a catalog dataset ({names})")
    if p.is_dir():
        raise UserError(f"--data {s} is a folder; pass a .csv, .tsv, .jsonl or .parquet file")
    return p


def _read_frame(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head.strip():
        raise UserError(f"{path}: the file is empty")
    if suffix == ".xls":
        raise UserError(f"{path}: old-style .xls is not read; save the sheet as .xlsx or CSV")
    if suffix not in (".parquet", ".xlsx", ".xlsm") and b"\x00" in head:
        raise UserError(f"{path}: looks like a binary file, not CSV/TSV/JSONL text; pass a text "
                        f"file, a .parquet or an .xlsx file")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".xlsx", ".xlsm"):  # the first sheet, its first row the header
            return pd.read_excel(path, dtype=str, keep_default_na=False, na_values=[""])
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".json":
            try:
                return pd.read_json(path, dtype=False)
            except ValueError:
                return pd.read_json(path, lines=True, dtype=False)
        sep = _separator(head.split(b"\n", 1)[0], "\t" if suffix in (".tsv", ".tab") else ",")
        with warnings.catch_warnings():
            # pandas reads a first row with one field too many as an index column, and with
            # index_col=False drops the field with only a warning: both misread the file
            warnings.simplefilter("error", pd.errors.ParserWarning)
            try:
                return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                                   na_values=[""], encoding="utf-8", on_bad_lines="error",
                                   index_col=False)
            except pd.errors.ParserWarning:
                raise UserError(_ragged(path, sep)) from None
    except UnicodeDecodeError:
        raise _not_utf8(path, path.read_bytes()) from None
    except UserError:
        raise
    except ImportError:
        raise UserError(f"{path}: reading {suffix} needs an extra package: pip install "
                        f"{_engine(suffix)}") from None
    except Exception as e:  # pandas' parser errors name the line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: could not be parsed as {suffix or 'CSV'} ({msg})") from None


def _not_utf8(path: Path, raw: bytes) -> UserError:
    """The error for a file that is not UTF-8, naming the line of its first bad byte."""
    try:
        raw.decode("utf-8")
        where = ""
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = f" at line {line}"
    fixed = path.with_name(f"{path.stem}-utf8{path.suffix}")
    return UserError(f"{path}: not valid UTF-8{where}; re-save it as UTF-8 (from Excel's "
                     f"Windows-1252, say: iconv -f CP1252 -t UTF-8 {shlex.quote(str(path))} > "
                     f"{shlex.quote(str(fixed))})")


def _separator(header: bytes, default: str) -> str:
    """The header line's field separator: ``default`` if it occurs there, else whichever of
    tab, semicolon (spreadsheets in many locales) or pipe does."""
    if default.encode() in header:
        return default
    found = [(header.count(c.encode()), c) for c in ("\t", ";", "|", ",") if c != default]
    n, c = max(found)
    return c if n else default


def _ragged(path: Path, sep: str) -> str:
    """The message for a row with more fields than the header, naming its line."""
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter=sep)
        width = len(next(rows))
        for row in rows:
            if len(row) > width:
                return (f"{path}: line {rows.line_num} has {len(row)} fields, the header "
                        f"{width}; put quotes around texts that contain {sep!r}")
    return f"{path}: rows have more fields than the header; check the quoting"


def _pick(columns: list[str], flag: str, given: str | None, names: tuple[str, ...], path: Path,
          required: bool, df=None, exclude=None) -> str | None:
    if given is not None:
        if given not in columns:
            raise UserError(f"{path}: no column {given!r} ({flag}); columns found: "
                            f"{', '.join(map(str, columns))}")
        return given
    lower = {str(c).lower(): c for c in columns}
    for n in names:
        if n in lower:
            return lower[n]
    if required:
        what = flag[2:].replace('-col', '')
        hint = _likely_column(df, what, exclude) if df is not None else None
        raise UserError(f"{path}: cannot tell which column is the {what}; columns found: "
                        f"{', '.join(map(str, columns))}; pass {flag} NAME"
                        + (f" ({hint!r} looks like it)" if hint is not None else ""))
    return None


def _likely_column(df, what: str, exclude=None):
    """For the error when no column has a known name: the column that looks like the text (the
    longest values, not numbers) or the label (the fewest distinct values, 2 at least, far fewer
    than the rows), or None."""
    sample = df.head(2000)
    best, best_key = None, None
    for c in sample.columns:
        if c == exclude:
            continue
        vals = [str(v) for v in sample[c].tolist() if not _isna(v) and str(v).strip()]
        if not vals:
            continue
        if what == "text":
            if all(_is_number(v) for v in vals[:200]):
                continue
            key = sum(map(len, vals)) / len(vals)
            if best_key is None or key > best_key:
                best, best_key = c, key
        else:
            n = len(set(vals))
            if 2 <= n <= max(2, len(vals) // 4) and (best_key is None or n < best_key):
                best, best_key = c, n
    return best


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _where(path: Path, i: int) -> str:
    """Where the ``i``-th data row (0-based) is in ``path``, as its editor shows it."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return f"row {i + 1}"
    if suffix in (".xlsx", ".xlsm"):
        return f"row {i + 2}"  # (the sheet's own row numbers, the header in row 1)
    if suffix == ".json":
        return f"record {i + 1}"
    if suffix in (".jsonl", ".ndjson"):
        return f"line {i + 1}"
    return f"line {i + 2}"  # (after the header; a quoted field spanning lines shifts this)


def _frame(path: Path, df=None):
    """``path`` read as a frame (``df`` if already read), or the error that it is missing or
    empty."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if df is None:
        df = _read_frame(path)
    if len(df) == 0:
        raise UserError(f"{path}: has no rows")
    return df


def _strings(column) -> list[str]:
    """A frame column as strings, missing values as ``""``."""
    return ["" if _isna(v) else str(v) for v in column.tolist()]


def read_table(path: str | Path, *, text_col: str | None = None, label_col: str | None = None,
               pair_col: str | None = None, require_labels: bool = True,
               multi_label: bool = False, label_sep: str | None = None) -> Table:
    """Read CSV / TSV / JSONL / Parquet into a :class:`Table`.

    Rows with an empty text (or missing label) are dropped with a warning; if none remain it is
    an error. ``multi_label``: each row's labels are a set of tags (see :func:`read_tags`); an
    empty label cell is a row with no tag.
    """
    path = Path(path)
    df = _frame(path)
    cols = list(df.columns)
    tcol = _pick(cols, "--text-col", text_col, TEXT_NAMES, path, True, df)
    pcol = _pick(cols, "--text-pair-col", pair_col, PAIR_NAMES, path, False) if pair_col else None
    texts = _strings(df[tcol])
    keep = [i for i, t in enumerate(texts) if t.strip()]
    n_empty = len(texts) - len(keep)
    if n_empty:
        log.warning("%s: %d rows have an empty text and were dropped", path, n_empty)
    if multi_label:
        if not keep:
            raise UserError(f"{path}: every text is empty (text column {tcol!r}); is --text-col "
                            f"right?")
        tags, sep = read_tags(df, path, label_col, label_sep)
        warn_spellings(path, [t for i in keep for t in tags[i]])
        pairs = None if pcol is None else _strings(df[pcol].iloc[keep])
        return Table([texts[i] for i in keep], [tags[i] for i in keep], pairs, str(path), sep,
                     keep)
    lcol = _pick(cols, "--label-col", label_col, LABEL_NAMES, path, require_labels, df, tcol)
    labels = None
    if lcol is not None:
        raw = df[lcol].tolist()
        labels_all = [None if _isna(y) else _label_str(y) for y in raw]
        missing = [i for i in keep if labels_all[i] is None]
        if missing:
            log.warning("%s: %d rows have no label (first: %s) and were dropped", path,
                        len(missing), _where(path, missing[0]))
            keep = [i for i in keep if labels_all[i] is not None]
        labels = [labels_all[i] for i in keep]
        warn_spellings(path, labels)
    if not keep:
        raise UserError(f"{path}: no rows left after dropping {len(texts)} with an empty text or "
                        f"label (text column {tcol!r}); is --text-col right?")
    pairs = None
    if pcol is not None:
        pairs = _strings(df[pcol].iloc[keep])
    return Table([texts[i] for i in keep], labels, pairs, str(path), rows=keep)


def warn_spellings(path: Path, labels: list[str]) -> None:
    """Warn about labels that differ only in case or inner spacing ('Pos' and 'pos'): they
    train as different classes, which is rarely what the file meant."""
    from collections import Counter

    counts = Counter(labels)
    groups: dict[str, list[str]] = {}
    for name in counts:
        groups.setdefault(" ".join(name.casefold().split()), []).append(name)
    for g in (sorted(g, key=lambda n: -counts[n]) for g in groups.values() if len(g) > 1):
        log.warning("%s: labels %s differ only in case or spacing; they are trained as %d "
                    "different classes. If they are one, write them alike in the file",
                    path, " and ".join(f"{n!r} ({counts[n]} rows)" for n in g), len(g))


TAG_SEPARATORS = ("|", ";", ",")
TAG_JOIN = "|"
"""Joins a row's tags in one cell (predictions.csv, predict) when the data gave no separator."""


def is_tag_lists(labels: list) -> bool:
    """Whether ``labels`` are multi-label rows (tuples of tags) rather than one label a row."""
    return bool(labels) and isinstance(labels[0], tuple)
_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f", ""}


def read_tags(df, path: Path, label_col: str | None, sep: str | None
              ) -> tuple[list[tuple[str, ...]], str | None]:
    """Multi-label tags of every row of ``df``, as sorted tuples, and the separator used.

    ``label_col`` naming several columns (``toxic,insult``): each is one tag, its 0/1 (or
    true/false, yes/no) cells saying whether a row has it. One column: a list (JSONL, Parquet),
    a JSON list as text, or tags separated by ``sep`` (default: the first of | ; , found in
    the column). An empty cell is a row without tags."""
    cols = list(df.columns)
    names = [c.strip() for c in label_col.split(",")] if label_col and label_col not in cols \
        else [label_col]
    if len(names) > 1:
        for n in names:
            _pick(cols, "--label-col", n, LABEL_NAMES, path, True)
        flags = []
        for n in names:
            col = []
            for i, v in enumerate(df[n].tolist()):
                v = "" if _isna(v) else str(v).strip().lower()
                if v not in _TRUE and v not in _FALSE:
                    raise UserError(f"{path}: column {n!r} at {_where(path, i)} holds {v!r}; "
                                    f"0/1 tag columns take 1/0, true/false or yes/no")
                col.append(v in _TRUE)
            flags.append(col)
        return [tuple(sorted(n for n, f in zip(names, row) if f)) for row in zip(*flags)], None
    lcol = _pick(cols, "--label-col", names[0], LABEL_NAMES, path, True)
    raw = df[lcol].tolist()
    cells = []
    for i, v in enumerate(raw):
        if isinstance(v, str) and v.strip().startswith("["):
            try:
                v = json.loads(v)
            except ValueError:
                raise UserError(f"{path}: the label at {_where(path, i)} starts with '[' but is "
                                f"not a JSON list ({v[:40]!r}); write [\"a\", \"b\"] or a|b") \
                    from None
        cells.append(v)
    strings = [v for v in cells if isinstance(v, str)]
    if sep is None and strings:
        sep = next((c for c in TAG_SEPARATORS if any(c in v for v in strings)), None)
    out = []
    for v in cells:
        if isinstance(v, str):
            tags = v.split(sep) if sep else [v]
        elif hasattr(v, "__iter__"):  # a list from JSON / Parquet
            tags = list(v)
        else:
            tags = [] if _isna(v) else [v]
        out.append(tuple(sorted({_label_str(t) for t in tags} - {""})))
    return out, sep


def read_inputs(path: str | Path, *, text_col: str | None = None, pair_col: str | None = None,
                run_text_col: str | None = None):
    """A file to predict on: the frame as read (every column, every row, in order), the rows
    that have a text as a :class:`Table`, and their positions in the frame. Without
    ``text_col``, the training run's text column (``run_text_col``) if the file has it, else
    the usual names."""
    path = Path(path)
    lines = _lines(path, run_text_col) if text_col is None and path.is_file() else None
    return frame_inputs(_frame(path, lines), path, text_col=text_col, pair_col=pair_col,
                        run_text_col=run_text_col)


def frame_inputs(df, path, *, text_col: str | None = None, pair_col: str | None = None,
                 run_text_col: str | None = None):
    """:func:`read_inputs` for a frame already read (``path``: how messages name it)."""
    cols = list(df.columns)
    if text_col is None and run_text_col in cols:
        text_col = run_text_col
    tcol = _pick(cols, "--text-col", text_col, TEXT_NAMES, path, True, df)
    pcol = _pick(cols, "--text-pair-col", pair_col, PAIR_NAMES, path, False) if pair_col else None
    texts = _strings(df[tcol])
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if not keep:
        raise UserError(f"{path}: every text is empty (text column {tcol!r}); is --text-col "
                        f"right?")
    if len(keep) < len(texts):
        log.warning("%s: %d rows have an empty text: their predictions are left blank", path,
                    len(texts) - len(keep))
    pairs = None
    if pcol is not None:
        pairs = _strings(df[pcol].iloc[keep])
    return df, Table([texts[i] for i in keep], None, pairs, str(path), text_col=tcol), keep


def _engine(suffix: str) -> str | None:
    """The extra package writing ``suffix`` needs, if any."""
    return {".parquet": "pyarrow", ".xlsx": "openpyxl", ".xlsm": "openpyxl"}.get(suffix)


def check_writable(path: str | Path) -> None:
    """Before hours of work: the format ``path`` names can be written here, where a file can
    be (its missing folders are made when it is written)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--output {path}: is a folder; give a file name, e.g. "
                        f"{path / 'predictions.csv'}")
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir() or not os.access(above, os.W_OK):
        raise UserError(f"--output {path}: cannot be written ({above} is "
                        f"{'a file' if not above.is_dir() else 'not writable'}); choose another "
                        f"place")
    engine = _engine(path.suffix.lower())
    if engine is None:
        return
    import importlib.util

    if importlib.util.find_spec(engine) is None:
        raise UserError(f"--output {path}: writing {Path(path).suffix} needs {engine}: pip "
                        f"install {engine}, or write .csv / .jsonl")


def _lines(path: Path, run_text_col: str | None = None):
    """A ``.txt`` file whose first line is not a header naming a text column (one of the usual
    names, or the run's): one text per line, in a frame with a ``text`` column. Else None."""
    if path.suffix.lower() != ".txt":
        return None
    import pandas as pd

    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise _not_utf8(path, raw) from None
    header = lines[0] if lines else ""
    sep = _separator(header.encode(), ",")
    names = {*TEXT_NAMES, (run_text_col or "").lower()} - {""}
    if any(f.strip().strip('"').lower() in names for f in header.split(sep)):
        return None
    return pd.DataFrame({"text": lines})


def output_format(path: Path | None, jsonl: bool = False) -> str:
    """What an output's suffix names: json (lines), tsv, parquet, excel or csv (the default;
    no path: standard output, CSV or ``jsonl``)."""
    suffix = path.suffix.lower() if path else (".jsonl" if jsonl else ".csv")
    return {".jsonl": "json", ".json": "json", ".ndjson": "json", ".tsv": "tsv", ".tab": "tsv",
            ".parquet": "parquet", ".xlsx": "excel", ".xlsm": "excel"}.get(suffix, "csv")


def write_frame(df, path: str | Path) -> None:
    """``df`` to ``path`` in the format its suffix names: .jsonl/.json (one object a line),
    .tsv, .parquet, .xlsx, otherwise CSV. Written beside it and moved into place, so a failed
    write leaves whatever was there."""
    path = Path(path)
    kind = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        if kind == "json":
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        elif kind == "parquet":
            df.to_parquet(tmp, index=False)
        elif kind == "excel":
            df.to_excel(tmp, index=False)
        else:
            df.to_csv(tmp, sep="\t" if kind == "tsv" else ",", index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class FrameSink:
    """Frames written one after another as one table: to ``path`` (its suffix names the format,
    as :func:`write_frame`), or to standard output (CSV, or JSON lines with ``jsonl``). CSV,
    TSV and JSON lines are appended as they come, beside ``path``, and moved into place by
    :meth:`close`; Parquet and Excel frames are gathered and written at the end. :meth:`abort`
    (the work stopped) keeps the rows written so far as ``<name>.partial<suffix>``."""

    def __init__(self, path: str | Path | None, jsonl: bool = False, resume: int = 0):
        self.path = Path(path) if path is not None else None
        self.format = self.format_of(self.path, jsonl)
        """json, tsv or csv (appended as they come), or gather (written at the end)."""
        self.rows = 0
        self.frames: list = []
        self.tmp: Path | None = None
        self.handle = sys.stdout
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.path.with_name(f".{self.path.stem}.tmp{self.path.suffix}")
            if resume:  # (the partial file's rows, checked by the caller: appended to)
                os.replace(self.partial(self.path), self.tmp)
                self.rows = resume
            if self.format != "gather":
                self.handle = open(self.tmp, "a" if resume else "w", encoding="utf-8",
                                   newline="")

    @staticmethod
    def format_of(path: Path | None, jsonl: bool = False) -> str:
        kind = output_format(path, jsonl)
        return "gather" if kind in ("parquet", "excel") else kind

    @staticmethod
    def partial(path: Path, n: int = 1) -> Path:
        """Where the rows of a stopped run go (``n``: the n-th such file)."""
        return path.with_name(f"{path.stem}.partial{n if n > 1 else ''}{path.suffix}")

    @classmethod
    def read_partial(cls, path: Path):
        """The partial file of ``path``'s stopped run, every cell a string ("" if empty)."""
        import pandas as pd

        part, kind = cls.partial(path), output_format(path)
        if kind == "json":
            df = pd.read_json(part, orient="records", lines=True, dtype=False)
            return df.astype(object).map(lambda v: "" if _isna(v) else str(v))
        return pd.read_csv(part, sep="\t" if kind == "tsv" else ",", dtype=str,
                           keep_default_na=False)

    def write(self, df) -> None:
        if self.format == "gather":
            self.frames.append(df)
        elif self.format == "json":
            df.to_json(self.handle, orient="records", lines=True, force_ascii=False)
        else:
            df.to_csv(self.handle, sep="\t" if self.format == "tsv" else ",", index=False,
                      header=self.rows == 0)
        self.handle.flush()
        self.rows += len(df)

    def close(self) -> None:
        if self.path is None:
            return
        if self.format == "gather":
            import pandas as pd

            write_frame(pd.concat(self.frames) if self.frames else pd.DataFrame(), self.path)
            return
        self.handle.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> Path | None:
        """The rows written so far kept beside the output (its path), or nothing."""
        if self.path is None or self.format == "gather":
            return None
        self.handle.close()
        if not self.rows:
            self.tmp.unlink(missing_ok=True)
            return None
        partial, n = self.partial(self.path), 1
        while partial.exists():  # (an earlier one is the user's now: kept)
            n += 1
            partial = self.partial(self.path, n)
        os.replace(self.tmp, partial)
        return partial


def _isna(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _label_str(y) -> str:
    if isinstance(y, float) and y.is_integer():
        y = int(y)
    return str(y).strip()


# ---------------------------------------------------------------------------------------------
# labels


def build_label_names(labels: list[str] | list[tuple[str, ...]]) -> list[str]:
    """Sorted label names (multi-label: every tag); numeric labels sort as numbers ('2' <
    '10')."""
    uniq = {t for tags in labels for t in tags} if is_tag_lists(labels) else set(labels)
    try:
        return sorted(uniq, key=lambda s: float(s))
    except ValueError:
        return sorted(uniq)


def encode_labels(labels: list[str] | list[tuple[str, ...]], names: list[str],
                  source: str) -> np.ndarray:
    """Label indices ``[n]``; multi-label tags: a 0/1 float matrix ``[n, len(names)]``."""
    index = {n: i for i, n in enumerate(names)}
    multi = is_tag_lists(labels)
    unseen = sorted(({t for tags in labels for t in tags} if multi else set(labels)) - set(index))
    if unseen:
        raise UserError(f"{source}: labels {unseen[:5]} do not occur in the training data "
                        f"(known: {names[:10]}); fix the labels or add them to the training file")
    if multi:
        y = np.zeros((len(labels), len(names)), dtype=np.float32)
        for r, tags in enumerate(labels):
            y[r, [index[t] for t in tags]] = 1
        return y
    return np.array([index[y] for y in labels], dtype=np.int64)


def strata(labels: list[str] | list[tuple[str, ...]]) -> list[str]:
    """What a stratified split balances: the label; for multi-label rows, the row's rarest tag
    (so rare tags reach every split), "" for a row without tags."""
    if not is_tag_lists(labels):
        return list(labels)
    counts: dict[str, int] = {}
    for tags in labels:
        for t in tags:
            counts[t] = counts.get(t, 0) + 1
    return [min(tags, key=lambda t: (counts[t], t)) if tags else "" for tags in labels]


def save_labels(names: list[str], path: Path) -> None:
    path.write_text(json.dumps(names, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# splits


def exact_keys(table: Table) -> list:
    """What makes two rows one text for the split: the text (and its pair), exactly."""
    return table.texts if table.pairs is None else list(zip(table.texts, table.pairs))


def distinct_texts(table: Table) -> dict[str, int]:
    """Each label's number of distinct texts (exact duplicates count once, as the split keeps
    them together)."""
    seen: dict[str, set] = {}
    for k, y in zip(exact_keys(table), table.labels):
        seen.setdefault(y, set()).add(k)
    return {y: len(v) for y, v in seen.items()}


def drop_rare_classes(table: Table, under: int) -> tuple[Table, dict[str, int]]:
    """``--drop-classes-under N``: ``table`` without the rows of classes that have fewer than
    ``under`` distinct texts, and those classes with their row counts (warned)."""
    if table.multi_label:
        raise UserError("--drop-classes-under is for single-label data; with --multi-label "
                        "rare tags share a stratum and need no flag")
    if under < 0:
        raise UserError(f"--drop-classes-under {under}: give a number of texts, 1 or more")
    n = distinct_texts(table)
    rare = sorted((y for y, c in n.items() if c < under), key=lambda y: (n[y], y))
    if not rare:
        return table, {}
    rows = {y: 0 for y in rare}
    keep = []
    for i, y in enumerate(table.labels):
        if y in rows:
            rows[y] += 1
        else:
            keep.append(i)
    shown = ", ".join(f"{y!r} ({rows[y]})" for y in rare[:10])
    log.warning("%s: --drop-classes-under %d leaves out %d rows of %d classes: %s%s; the "
                "classifier will not know them", table.source, under, len(table) - len(keep),
                len(rare), shown, f" and {len(rare) - 10} more" if len(rare) > 10 else "")
    if not keep:
        raise UserError(f"{table.source}: --drop-classes-under {under} leaves no rows")
    return table.subset(keep), rows


def warn_conflicts(table: Table, groups: dict) -> None:
    """Say so when one text has different labels in different rows: no model can get them all
    right, and it is often a labelling mistake worth fixing in the file."""
    def label(i):
        y = table.labels[i]
        return y if isinstance(y, str) else "+".join(sorted(y))

    conflicts = [g for g in groups.values() if len(g) > 1 and len({label(i) for i in g}) > 1]
    if not conflicts:
        return
    g = conflicts[0]
    where = f"row {g[0]}" if table.rows is None else _where(Path(table.source), table.rows[g[0]])
    log.warning("%s: %d texts have different labels in different rows (first: %s, %r: %s); no "
                "model can get them all right: fix the file, or let `textune cv` list the likely "
                "wrong labels (label_issues.csv)", table.source, len(conflicts), where,
                table.texts[g[0]][:60], " / ".join(sorted({label(i) for i in g})))


def split_indices(table: Table, val_fraction: float, test_fraction: float, seed: int,
                  need: tuple[bool, bool] = (True, True), fold: tuple[int, int] | None = None
                  ) -> tuple[list[int], list[int], list[int]]:
    """Stratified train/val/test split in which exact-duplicate texts stay together. ``fold``
    ``(k, K)``: the test split is the k-th of K stratified folds (cross-validation; every row
    is in exactly one fold's test split), the validation split comes from the other folds."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    assert table.labels is not None
    key = exact_keys(table)
    groups: dict = {}
    for i, k in enumerate(key):
        groups.setdefault(k, []).append(i)
    n_dup = len(table) - len(groups)
    if n_dup:
        log.warning("%s: %d rows repeat an earlier text; each text is kept within one split",
                    table.source, n_dup)
        warn_conflicts(table, groups)
    reps = [g[0] for g in groups.values()]
    multi = table.multi_label
    glabels = strata([table.labels[i] for i in reps])
    counts: dict[str, int] = {}
    for y in glabels if not multi else [t for i in reps for t in table.labels[i]]:
        counts[y] = counts.get(y, 0) + 1
    if len(counts) < 2:
        what = "tag" if multi else "class"
        raise UserError(f"{table.source}: only one {what} ({next(iter(counts), None)!r}); a "
                        f"classifier needs at least two (is --label-col right?)")
    n_parts = 1 + sum(need)
    minimum = n_parts + 1 if fold is None else max(n_parts + 1, fold[1] + need[0])
    small = sorted((c, y) for y, c in counts.items() if c < minimum)
    if small:
        c, y = small[0]
        what, plural = ("tag", "tags") if multi else ("class", "classes")
        more = f" (and {len(small) - 1} more {plural} under {minimum})" if len(small) > 1 else ""
        drop = "" if multi else (f"--drop-classes-under {minimum} to leave "
                                 f"{'them' if len(small) > 1 else 'it'} out, ")
        last = "use fewer folds" if fold else "pass --val and --test files"
        raise UserError(f"{table.source}: {what} {y!r} has only {c} distinct text(s){more}; a "
                        f"stratified split needs at least {minimum} per {what}: add examples, "
                        f"{drop}or {last}")
    if multi:  # rows whose rarest tag is still too rare to stratify on share a stratum
        from collections import Counter

        n = Counter(glabels)
        common = n.most_common(1)[0][0]
        rare = sum(c for c in n.values() if c < minimum)
        glabels = [y if n[y] >= minimum else "\0rare" if rare >= minimum else common
                   for y in glabels]
        counts = dict(Counter(glabels))
    need_val, need_test = need
    rest, rest_y = np.arange(len(reps)), glabels
    val_g, test_g = np.array([], dtype=int), np.array([], dtype=int)
    remaining = 1.0
    if fold is not None:
        k, folds = fold
        train_g, test_pos = list(StratifiedKFold(folds, shuffle=True, random_state=seed)
                                 .split(rest, rest_y))[k]
        test_g, rest, rest_y = rest[test_pos], rest[train_g], [rest_y[i] for i in train_g]
        remaining -= 1 / folds
    elif need_test:
        size = max(test_fraction, len(counts) / len(rest))  # at least one per class
        rest, test_g, rest_y, _ = train_test_split(rest, rest_y, test_size=size,
                                                   random_state=seed, stratify=rest_y)
        remaining -= test_fraction
    if need_val:
        size = max(val_fraction / remaining, len(counts) / len(rest))
        rest, val_g, rest_y, _ = train_test_split(rest, rest_y, test_size=size,
                                                  random_state=seed, stratify=rest_y)

    def expand(gs) -> list[int]:
        return sorted(i for g in gs for i in groups[key[reps[g]]])

    return expand(rest), expand(val_g), expand(test_g)


def limit_indices(idx: list[int], labels: list, limit: int | None, seed: int) -> list[int]:
    """A stratified sample of ``limit`` training rows (all of them if fewer)."""
    if limit is None or limit >= len(idx):
        return idx
    from sklearn.model_selection import train_test_split

    ys = strata([labels[i] for i in idx])
    try:
        keep, _ = train_test_split(idx, train_size=limit, random_state=seed, stratify=ys)
    except ValueError:
        keep = list(np.random.default_rng(seed).choice(idx, size=limit, replace=False))
    return sorted(int(i) for i in keep)


# ---------------------------------------------------------------------------------------------
# tokenization


@dataclass
class Encoded:
    """Token ids of a split, ready for length-grouped batching.

    With ``rows`` (``--truncation windows``) a sequence is one window of a text: ``rows[i]`` is
    the text it comes from (windows of a text are adjacent), ``labels`` are per window, and
    ``pool`` turns per-window logits into per-text ones."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray | None
    pad_id: int
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_rows(self) -> int:
        """Texts encoded (``len`` counts sequences: windows, with ``rows``)."""
        return len(self) if self.rows is None else len(self._starts)

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        """Each text's first window."""
        return np.flatnonzero(np.r_[True, self.rows[1:] != self.rows[:-1]])

    @property
    def row_labels(self) -> np.ndarray | None:
        """Labels per text (``labels`` are per sequence)."""
        if self.rows is None or self.labels is None:
            return self.labels
        return self.labels[self._starts]

    def pool(self, logits: np.ndarray) -> np.ndarray:
        """Per-sequence logits -> per-text logits: the mean over a text's windows."""
        if self.rows is None:
            return logits
        sums = np.add.reduceat(logits.astype(np.float64), self._starts, axis=0)
        return (sums / np.diff(np.r_[self._starts, len(self)])[:, None]).astype(logits.dtype)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))

    def select(self, idx) -> Encoded:
        """The sequences ``idx``, in that order (windows: no longer grouped into texts)."""
        return Encoded([self.input_ids[i] for i in idx],
                       None if self.token_type_ids is None else [self.token_type_ids[i] for i in idx],
                       None if self.labels is None else self.labels[np.asarray(idx, dtype=np.int64)],
                       self.pad_id)

    def join(self, other: Encoded) -> Encoded:
        """These rows, then ``other``'s (both encoded alike; windows: ``other``'s texts are
        numbered after these)."""
        assert (self.rows is None) == (other.rows is None)
        rows = None if self.rows is None else np.concatenate(
            [self.rows, other.rows + (int(self.rows[-1]) + 1 if len(self.rows) else 0)])
        return Encoded(self.input_ids + other.input_ids,
                       None if self.token_type_ids is None else
                       self.token_type_ids + other.token_type_ids,
                       None if self.labels is None else np.concatenate([self.labels, other.labels]),
                       self.pad_id, rows)

    @functools.cached_property
    def _widest(self) -> int:
        return padded_width(int(self.lengths.max(initial=1)), 8)

    def collate(self, idx, multiple: int = 8) -> dict[str, torch.Tensor]:
        """Pad a batch to its longest row, rounded up by ``padded_width`` (fewer distinct shapes).
        The ladder never pads past the longest row of the data (rounded to 8): a model whose
        position limit is not a rung (say 300) still gets rows it can take."""
        seqs = [self.input_ids[i] for i in idx]
        longest = max(len(s) for s in seqs)
        width = padded_width(longest, multiple)
        if multiple == LADDER:
            width = min(width, max(padded_width(longest, 8), self._widest))
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = s
            mask[r, : len(s)] = 1
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.token_type_ids is not None:
            tt = np.zeros((len(seqs), width), dtype=np.int64)
            for r, i in enumerate(idx):
                tt[r, : len(self.token_type_ids[i])] = self.token_type_ids[i]
            out["token_type_ids"] = torch.from_numpy(tt)
        if self.labels is not None:
            out["labels"] = torch.from_numpy(self.labels[np.asarray(idx)])
        return out


def model_max_length(tokenizer, config) -> int:
    limits = [getattr(config, "max_position_embeddings", None)]
    tm = getattr(tokenizer, "model_max_length", None)
    if tm and tm < 1_000_000:
        limits.append(tm)
    limits = [x for x in limits if x]
    return min(limits) if limits else 512


def text_lengths(tokenizer, table: Table, sample: int = 2000, seed: int = 0) -> np.ndarray:
    """Tokens of up to ``sample`` texts of the table (a seeded sample), uncut."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(table), size=min(sample, len(table)), replace=False)
    sub = table.subset(idx)
    ids, _ = tokenize(tokenizer, sub.texts, sub.pairs, None)
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))


def choose_max_length(lengths: np.ndarray, cap: int) -> int:
    """A length covering ~99% of the texts (rounded up to 8), capped by the model."""
    p99 = int(np.percentile(lengths, 99))
    return int(min(cap, max(8, -(-p99 // 8) * 8)))


PARALLEL_MIN = 2048
"""Tokenize in parallel threads from this many texts up."""


def tokenize(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int | None
             ) -> tuple[list, list | None]:
    """Token ids (and token type ids) of texts, truncated to ``max_length`` (None: not cut).

    Many texts go straight to the Rust tokenizer in chunks on a thread pool (it releases the
    GIL), skipping the per-text Python of the Hugging Face call and staying parallel where
    ``TOKENIZERS_PARALLELISM=false`` turns the tokenizer's own threads off (measured, 4,096
    long texts: 2.1 s vs 2.7 s on 2 cores, 0.52 s vs 0.57 s on 16). The result is checked
    against the Hugging Face call on the first rows; any difference and that call does it all."""

    def hf(t, p):
        enc = tokenizer(t, p, truncation=max_length is not None, max_length=max_length,
                        return_attention_mask=False, verbose=False)  # (no "too long" warning)
        return enc["input_ids"], enc.get("token_type_ids")

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or len(texts) < PARALLEL_MIN:
        return hf(texts, pairs)
    check = hf(texts[:16], None if pairs is None else pairs[:16])
    # the state the Hugging Face call sets before it encodes (it resets it on every call)
    backend.no_padding()
    if max_length is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(max_length, strategy="longest_first",
                                  direction=getattr(tokenizer, "truncation_side", "right"))
    inputs = texts if pairs is None else list(zip(texts, pairs))
    step = 256
    chunks = [inputs[i:i + step] for i in range(0, len(inputs), step)]

    def run(chunk):
        encs = backend.encode_batch(chunk, add_special_tokens=True)
        return [e.ids for e in encs], [e.type_ids for e in encs]

    from concurrent.futures import ThreadPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with ThreadPoolExecutor(max(1, min(8, cores or 1))) as pool:
        parts = list(pool.map(run, chunks))
    ids = [x for p in parts for x in p[0]]
    types = [x for p in parts for x in p[1]]
    if ids[:16] != check[0] or (check[1] is not None and types[:16] != check[1]):
        log.debug("fast tokenization differs from the Hugging Face call: using the latter")
        return hf(texts, pairs)
    return ids, (types if check[1] is not None else None)


LONG_TEXTS_HINT = 0.05
"""Above this share of training texts longer than --max-length, ``train`` suggests windows."""

UNKNOWN_WARN = 0.05
"""Above this share of unknown tokens, ``train`` warns and the report says so."""


def unknown_share(enc: Encoded, tokenizer, rows: int = 20000) -> float:
    """The share of the text tokens (special tokens aside) that are the tokenizer's unknown
    token, over up to ``rows`` rows: high when the vocabulary does not cover the text's
    language or script (minilm-l6 on Chinese reviews: 62%)."""
    unk = tokenizer.unk_token_id
    if unk is None or len(enc) == 0:
        return 0.0
    ids = np.concatenate([np.asarray(x) for x in enc.input_ids[:rows]])
    special = np.setdiff1d(np.asarray(tokenizer.all_special_ids), [unk])
    text = ids[~np.isin(ids, special)]
    return float((text == unk).mean()) if len(text) else 0.0


def encode(tokenizer, table: Table, max_length: int, truncation: str = "head",
           label_names: list[str] | None = None, max_windows: int = DataArgs.max_windows) -> Encoded:
    """Tokenize a table. ``truncation='head-tail'`` keeps the first quarter and the last
    three quarters of the token budget of a long text (Sun et al., 2019) instead of its start;
    ``'windows'`` cuts a long text into up to ``max_windows`` windows of ``max_length`` tokens
    spread evenly over it (see ``windows``)."""
    if truncation not in TRUNCATIONS:
        raise UserError(f"--truncation {truncation}: choose {', '.join(TRUNCATIONS)}")
    if truncation == "windows" and table.pairs is not None:
        raise UserError(NO_WINDOWS_FOR_PAIRS)
    rows = None
    if table.pairs is not None or truncation == "head":
        ids, tt = tokenize(tokenizer, table.texts, table.pairs, max_length)
    else:
        ids, tt = tokenize(tokenizer, table.texts, None, None)
        if truncation == "windows":
            ids, rows = windows(tokenizer, ids, max_length, max_windows)
        else:
            head = max_length // 4
            ids = [x if len(x) <= max_length else x[:head] + x[len(x) - (max_length - head):]
                   for x in ids]
    tt = tt if table.pairs is not None else None  # type ids only matter for pairs
    labels = None
    if table.labels is not None and label_names is not None:
        labels = encode_labels(table.labels, label_names, table.source)
        if rows is not None:
            labels = labels[rows]
    pad = tokenizer.pad_token_id
    assert pad is not None, "pad token must be set before encoding"
    return Encoded([np.asarray(x, dtype=np.int64) for x in ids],
                   None if tt is None else [np.asarray(x, dtype=np.int64) for x in tt],
                   labels, int(pad), rows)


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BERT: [CLS] / [SEP];
    LLaMA: <s> / none), read off how it encodes a one-word text."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_sp) - len(bare) + 1):
        if with_sp[i:i + len(bare)] == bare:
            return with_sp[:i], with_sp[i + len(bare):]
    return [], []


def windows(tokenizer, ids: list[list[int]], max_length: int, max_windows: int
            ) -> tuple[list[list[int]], np.ndarray]:
    """Texts (token ids with their special tokens) cut into windows of ``max_length`` tokens,
    each with the special tokens again. A text of n body tokens gets
    ``min(ceil(n / body), max_windows)`` windows of ``body`` tokens, their starts spread evenly
    from its first token to its last window (they overlap a little, so all are full; with the
    cap, they skip parts of a very long text evenly). Returns the windows and each one's text."""
    pre, post = special_tokens(tokenizer)
    body = max_length - len(pre) - len(post)
    if body < 1:
        raise UserError(f"--max-length {max_length}: too short for windows")
    out, rows = [], []
    for r, x in enumerate(ids):
        inner = x[len(pre):len(x) - len(post)] if x[:len(pre)] == pre and \
            (not post or x[len(x) - len(post):] == post) else x
        if len(inner) <= body:
            out.append(x)
            rows.append(r)
            continue
        n = min(-(-len(inner) // body), max_windows)
        for s in np.linspace(0, len(inner) - body, n).round().astype(int):
            out.append(pre + list(inner[s:s + body]) + post)
            rows.append(r)
    return out, np.asarray(rows, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# batching

LADDER = 0
"""``multiple`` value for geometric padding (see ``padded_width``)."""


def padded_width(n: int, multiple: int) -> int:
    """A batch width of ``n`` tokens rounded up to a multiple of ``multiple``; with ``LADDER``,
    to the next rung of a geometric ladder: multiples of 8 up to 64, then four rungs per
    doubling (80, 96, 112, 128, 160, ..., 256, 320, ...). Any length meets one of 20 widths up to
    512 (multiples of 8: 64 widths) and a row grows by less than a quarter (multiples of 64
    would more than double a 30-token text). On the GPU benchmark's 4,096 texts: 12 batch
    shapes and 13% padded tokens, against 26 and 6% (multiples of 8), 8 and 17% (of 64)."""
    if multiple != LADDER:
        return -(-n // multiple) * multiple
    step = max(8, (1 << (max(n, 1) - 1).bit_length()) // 8)
    return -(-n // step) * step


def batch_indices(lengths: np.ndarray | None, n: int, batch_size: int, *, shuffle: bool,
                  seed: int = 0, group: bool = True, pool: int = 64, max_tokens: int | None = None,
                  multiple: int = 8) -> list[list[int]]:
    """Batches of row indices.

    Training (``shuffle``): rows are shuffled, then sorted by length inside pools of
    ``pool * batch_size`` rows so that a batch holds similar lengths (little padding), and the
    batches are shuffled again. Inference: all rows sorted by length, longest first.

    ``max_tokens``: token-budget batches. A batch takes rows (longest first) while its padded
    size, rows x longest row rounded up to ``multiple``, stays within the budget, and at most
    ``batch_size`` rows: short texts go in many-row batches, long ones in few, and every batch
    costs about the same.
    """
    if lengths is None:
        max_tokens = None
    if not shuffle:
        order = np.argsort(-lengths, kind="stable") if lengths is not None else np.arange(n)
        return _cut(order, lengths, batch_size, max_tokens, multiple)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if not group or lengths is None:
        return _cut(order, lengths, batch_size, max_tokens, multiple)
    span = pool * batch_size if max_tokens is None else \
        max(pool * 32, pool * max_tokens // max(1, int(lengths.mean())))
    size = -(-n // max(1, -(-n // span)))  # pools of (nearly) equal size
    if max_tokens is None:
        size = -(-size // batch_size) * batch_size  # whole batches: only the last one is short
    # each pool is cut on its own: a batch spanning two pools would put one's shortest rows
    # with the next one's longest (rt-polarity, 3,000 rows in batches of 32: 4.3% of the
    # computed tokens were padding, 2.3% with pools cut apart)
    batches = [b for i in range(0, n, size) for c in [order[i:i + size]]
               for b in _cut(c[np.argsort(-lengths[c], kind="stable")], lengths, batch_size,
                             max_tokens, multiple)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def _cut(order: np.ndarray, lengths: np.ndarray | None, batch_size: int, max_tokens: int | None,
         multiple: int) -> list[list[int]]:
    if max_tokens is None:
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    out, i, n = [], 0, len(order)
    while i < n:
        # rows arrive longest first (sorted pool, or inference order): a batch's width is its
        # first row's; the running maximum keeps that true for any order
        width, j = 0, i
        while j < n and j - i < batch_size:
            w = max(width, padded_width(int(lengths[order[j]]), multiple))
            if j > i and (j - i + 1) * w > max_tokens:
                break
            width, j = w, j + 1
        out.append(order[i:j].tolist())
        i = j
    return out
