"""Real English text for evaluation: Jane Austen's six novels.

Source: the Debian package ``r-cran-janeaustenr`` (the R package janeaustenr, whose texts
come from Project Gutenberg and are in the public domain). It is fetched with
``apt-get download`` (no install, no R needed) and the novels are read straight out of
the package's R data file, which stores each novel as a character vector of lines.

    python -m vllm_turboquant.textdata        # prints the path of the cached text file
"""

from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from .models import cache_dir

DEBIAN_PACKAGE = "r-cran-janeaustenr"
_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


def _r_strings(blob: bytes) -> list[str]:
    """The strings of an R character vector in XDR serialization (format 2 or 3)."""
    if not blob.startswith(b"X\n"):
        raise ValueError("not an XDR-serialized R object")
    pos = 2 + 4 * 3  # format version, R version, minimal version
    version = struct.unpack(">i", blob[2:6])[0]
    if version == 3:
        n = struct.unpack(">i", blob[pos:pos + 4])[0]
        pos += 4 + n  # native encoding name
    flags, length = struct.unpack(">ii", blob[pos:pos + 8])
    if flags & 0xFF != 16:
        raise ValueError(f"expected a character vector (STRSXP), got type {flags & 0xFF}")
    pos += 8
    out = []
    for _ in range(length):
        _, n = struct.unpack(">ii", blob[pos:pos + 8])
        pos += 8
        if n < 0:
            out.append("")
            continue
        out.append(blob[pos:pos + n].decode("utf-8", "replace"))
        pos += n
    return out


def novels_from_rdb(rdb: Path) -> list[str]:
    """Each object of the lazy-load database is a 4-byte length and a zlib stream."""
    data, pos, novels = rdb.read_bytes(), 0, []
    while pos + 4 < len(data):
        z = zlib.decompressobj()
        blob = z.decompress(data[pos + 4:])
        pos = len(data) - len(z.unused_data)
        novels.append("\n".join(_r_strings(blob)))
    return novels


def ensure_english_text() -> Path:
    """Path of the cached text (about 4 MB, ~1M tokens), fetching the Debian package once."""
    out = cache_dir() / "text" / "austen.txt"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        fetch = ["apt-get", "download", DEBIAN_PACKAGE]
        if subprocess.run(fetch, cwd=tmp, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            done = subprocess.run(fetch, cwd=tmp, capture_output=True, text=True)
            if done.returncode != 0:
                # A machine without the Debian archive (the GPU machine has no network):
                # say where the file goes instead of a bare CalledProcessError.
                raise RuntimeError(
                    f"cannot fetch the evaluation text: `apt-get download {DEBIAN_PACKAGE}` "
                    f"failed ({done.stderr.strip()[-200:]!r}). Run `python -m "
                    f"vllm_turboquant.textdata` where apt works and copy {out} here (its "
                    f"folder is $VLLM_TURBOQUANT_CACHE, default ~/.cache/vllm_turboquant).")
        deb = glob.glob(os.path.join(tmp, "*.deb"))[0]
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(tmp, "x")], check=True)
        text = "\n\n".join(novels_from_rdb(Path(tmp, "x", _RDB)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


if __name__ == "__main__":
    print(ensure_english_text())
    sys.exit(0)
