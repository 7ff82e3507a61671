"""Rebuild hcsmoe/corpora/novels/: two of Jane Austen's novels (public domain), one chapter per line.

The text is Project Gutenberg's, as packaged by the R package janeaustenr (MIT) and shipped by Debian as
r-cran-janeaustenr; it is read from the package's lazy-load database with the `rdata` reader:

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb janeaustenr
    pip install rdata && python scripts/extract_novels.py janeaustenr

Hard-wrapped lines are joined into paragraphs (paragraphs stay separated by a blank line); each chapter is
one JSON line {"title", "text"}; the files are gzipped with a fixed timestamp so the output is byte-stable.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
import zlib
from pathlib import Path

import rdata

NOVELS = {"prideprejudice": "Pride and Prejudice", "persuasion": "Persuasion"}
DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
OUT = Path(__file__).resolve().parent.parent / "hcsmoe" / "corpora" / "novels"


def novel_lines(package: Path, name: str) -> list[str]:
    """The novel's lines as janeaustenr stores them (a character vector in its lazy-load database)."""
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((package / f"{DATA}.rdx").read_bytes())))
    offset, length = (int(v) for v in index["variables"][name])
    blob = (package / f"{DATA}.rdb").read_bytes()[offset:offset + length]
    return [str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))]


def chapters(lines: list[str]) -> list[str]:
    """Chapter texts (the title page dropped), wrapped lines joined, paragraphs separated by a blank line."""
    text = "\n".join(lines)
    parts = re.split(r"^\s*(?:CHAPTER|Chapter) [0-9IVXL]+\.?\s*$", text, flags=re.MULTILINE)[1:]
    result = []
    for part in parts:
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", part) if p.strip()]
        paragraphs = [p for p in paragraphs if p != "Finis"]
        result.append("\n\n".join(paragraphs))
    return result


def main() -> None:
    package = Path(sys.argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    for name, title in NOVELS.items():
        rows = [{"title": f"{title}, chapter {i}", "text": text}
                for i, text in enumerate(chapters(novel_lines(package, name)), start=1)]
        path = OUT / f"austen-{name}.jsonl.gz"
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
        print(f"{path}: {len(rows)} chapters, {sum(len(r['text']) for r in rows):,} characters")


if __name__ == "__main__":
    main()
