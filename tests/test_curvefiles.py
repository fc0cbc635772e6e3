"""Reading the authors' LayerChoice curve files."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from forensics.data.curvefiles import read_layerchoice
from forensics.errors import InputError

FAMILIES = {"ContraGAN", "BigGAN", "SNGAN", "ddpm", "ddim", "pndm"}


def _naive_values(path):
    """Values read independently: the text after ': ' is a JSON list."""
    return [json.loads(line.split(": ", 1)[1]) for line in path.read_text().splitlines()]


def test_small_file(shared_dir):
    path = shared_dir / "paper" / "Fsmall_score.txt"
    curves = read_layerchoice(path)
    assert len(curves) == 12
    assert {c["family"] for c in curves} == FAMILIES
    assert sorted(c["split"] for c in curves) == ["enroll"] * 6 + ["query"] * 6
    for family in FAMILIES:  # small: one enrolled and one query curve per family
        tags = sorted(c["split"] for c in curves if c["family"] == family)
        assert tags == ["enroll", "query"]
    for curve, expected in zip(curves, _naive_values(path), strict=True):
        np.testing.assert_array_equal(curve["values"], expected)
        assert curve["layers"] == [f"hidden_{i}" for i in range(12)]
    first = curves[0]
    assert (first["name"], first["family"], first["split"]) == (
        "ContraGAN_test_batch",
        "ContraGAN",
        "query",
    )
    assert first["values"][0] == -1.738038609961968
    prov = first["provenance"]
    assert prov["file"] == "Fsmall_score.txt" and prov["line"] == 1
    assert prov["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["encoder"] == "google/vit-base-patch16-224-in21k"
    assert prov["format"] == "layerchoice"


def test_full_file_repeated_names_get_distinct_models(shared_dir):
    curves = read_layerchoice(shared_dir / "paper" / "Ffull_score.txt")
    assert len(curves) == 18
    enrolled = [c for c in curves if c["split"] == "enroll"]
    assert len(enrolled) == 12
    assert {f: sum(c["family"] == f for c in enrolled) for f in FAMILIES} == dict.fromkeys(
        FAMILIES, 2
    )
    models = [c["model"] for c in curves]
    assert len(set(models)) == 18
    assert "ContraGAN_train_batch" in models and "ContraGAN_train_batch#2" in models
    assert [c["name"] for c in curves].count("ContraGAN_train_batch") == 2


def test_names_without_split_need_a_default(shared_dir):
    path = shared_dir / "paper" / "model_ct_scores_small.txt"
    with pytest.raises(InputError, match=r"model_ct_scores_small\.txt:1: .*ContraGAN_17_17"):
        read_layerchoice(path)
    curves = read_layerchoice(path, default_split="enroll")
    assert len(curves) == len(path.read_text().splitlines())
    assert {c["split"] for c in curves} == {"enroll"}
    assert curves[0]["family"] == "ContraGAN"


def _write(tmp_path, text, name="c.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_nan_and_blank_lines(tmp_path):
    path = _write(tmp_path, "\nA_train_x: [1.0, nan, -2e-3]\n\nB_test_x: [0.5, 1, .25]\n")
    curves = read_layerchoice(path)
    assert [c["line"] for c in curves] == [2, 4]
    assert math.isnan(curves[0]["values"][1])
    np.testing.assert_array_equal(curves[1]["values"], [0.5, 1.0, 0.25])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("A_train: [1.0, 2.0]\nB_test: 1.0, 2.0\n", r"c\.txt:2: expected 'NAME: \[v0"),
        ("A_train: [1.0, abc]\n", r"c\.txt:1: 'abc' is not a number"),
        ("A_train: [1.0, inf]\n", r"c\.txt:1: 'inf' is not a number"),
        ("A_train: [1.0, , 2.0]\n", r"c\.txt:1: '' is not a number"),
        ("A_train: []\n", r"c\.txt:1: curve 'A_train' has no values"),
        ("A_train: [1.0, 2.0]\nB_test: [1.0]\n", r"c\.txt:2: .*has 1 values but .*line 1 has 2"),
        ("A_train_test: [1.0]\n", r"c\.txt:1: .*both 'train' and 'test'"),
        ("A_batch: [1.0]\n", r"c\.txt:1: .*no '_train' or '_test'"),
        ("\n\n", r"holds no curves"),
    ],
)
def test_strict_errors_name_file_and_line(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        read_layerchoice(_write(tmp_path, text))


def test_missing_file_and_bad_default(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_layerchoice(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="default split"):
        read_layerchoice(_write(tmp_path, "A_train: [1.0]\n"), default_split="train")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="not UTF-8"):
        read_layerchoice(tmp_path / "bin.txt")
