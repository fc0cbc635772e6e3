"""Hostile and clumsy use of the bank and of attribution answers, kept from coming back.

Each test names the case it guards; ``docs/reliability.md`` ("Bank and chain of custody")
lists them with the command and the expected result.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from refbank import Bank

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["block0", "block1", "block2", "block3"]
W = "ab" * 32


def baseline_row(name: str = "base", **kw) -> dict:
    row = {"name": name, "encoder": "timm:tiny", "weights_sha256": W, "layers": LAYERS,
           "train_manifest_sha256": "t" * 64, "heldout_manifest_sha256": "p" * 64,
           "n_train": 100, "n_heldout": 50, "params": {"seed": 0}}
    row.update(kw)
    return row


def curve_row(bid: str, model: str = "m1", family: str = "fam", **kw) -> dict:
    row = {"model": model, "family": family, "encoder": "timm:tiny", "weights_sha256": W,
           "baseline_id": bid, "layers": LAYERS, "values": [0.1, 0.2, 0.3, 0.4],
           "n_images": 500, "manifest_sha256": "q" * 64}
    row.update(kw)
    return row


def save_arrays(folder: Path) -> None:
    np.save(folder / "centroids.npy", np.arange(12, dtype=np.float32).reshape(3, 4))


@pytest.fixture
def bank(tmp_path) -> Bank:
    return Bank(tmp_path / "bank")


@pytest.fixture
def bid(bank) -> str:
    return bank.add_baseline(baseline_row(), save=save_arrays)


# -- 1. concurrent readers ---------------------------------------------------------------------


WRITER = textwrap.dedent("""
    import sys
    from refbank import Bank
    bank = Bank(sys.argv[1])
    bid, n = sys.argv[2], int(sys.argv[3])
    for i in range(n):
        bank.add_curves([{"model": f"m{i}", "family": "fam", "encoder": "timm:tiny",
                          "weights_sha256": "ab" * 32, "baseline_id": bid,
                          "layers": ["block0", "block1", "block2", "block3"],
                          "values": [0.1, 0.2, 0.3, float(i)], "n_images": 500,
                          "manifest_sha256": f"{i:064d}"}])
""")


def test_a_reader_never_sees_an_error_while_another_process_appends(bank, bid):
    """Case: one process appends curves while another reads the table in a loop."""
    n_writes, max_reads, limit_s = 100, 20_000, 15.0
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(bank.path), bid, str(n_writes)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
    errors, reads, counts = [], 0, []
    start = time.monotonic()
    try:
        while reads < max_reads and time.monotonic() - start < limit_s:
            done = writer.poll() is not None
            try:
                table = bank.curves_table()
            except Exception as exc:  # noqa: BLE001 - any error is the failure counted
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                assert isinstance(table, pa.Table)
                assert table.column_names[-1] == "row_sha256"
                counts.append(table.num_rows)
            reads += 1
            if done:
                break
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0, writer.stderr.read()
    assert errors == [], f"{len(errors)} of {reads} reads failed: {errors[:3]}"
    assert counts == sorted(counts), "a reader saw rows disappear"
    assert bank.curves_table().num_rows == n_writes
