"""The short version of ``bench/topk_variants.py``: every variant runs, and the table reports each one. (The full
comparison, 50 rounds and three seeds, is the script's default; its figures are in bench/README.md.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = ["none", "topk", "dense-small", "global", "count", "hint", "start-residual", "per-row", "half-residual", "ef21",
            "sqrt-share", "dense-conv"]


def test_every_variant_trains_and_is_reported(shared_data: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "topk_variants.py"), "--variants", *VARIANTS, "--seeds", "1",
         "--rounds", "3", "--jobs", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "FEDLINK_SHARED_DATA": str(shared_data)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = dict(re.findall(r"^\| ([a-z0-9-]+) \| ([\d.]+)% \|", done.stdout, flags=re.MULTILINE))
    assert list(rows) == VARIANTS, done.stdout
    accuracy = {variant: float(value) for variant, value in rows.items()}
    assert accuracy["none"] > 20, accuracy  # three rounds of FedAvg learn (34% here); chance is 10%
    # Sparse updates move the model less in three rounds than dense ones: the variants really sparsify.
    assert accuracy["topk"] < accuracy["none"], accuracy
