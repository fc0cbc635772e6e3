"""Curves and their provenance; a curve's bank row round trip."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest

from forensics import __version__
from forensics.errors import InputError
from forensics.stats.curve import Curve, make_provenance

LAYERS = ["b0", "b1", "b2"]


def provenance(**kw):
    args = dict(
        manifest_sha256="m" * 64, n_images=np.int64(40), encoder="timm:tiny",
        weights_sha256="w" * 64, baseline_id="b_1", baseline_name="base",
        params={"partitioner": "kmeans", "distance": "l2", "tau": 0.2, "pooling": "cls",
                "seed": np.int64(7), "n_cells": 16, "proj": np.array([1, 2])},
        folder="/data/suspect",
    )
    args.update(kw)
    return make_provenance(**args)


def test_curve_validates_and_converts():
    c = Curve(("a", "b"), [1, 2])
    assert c.layers == ["a", "b"] and c.values.dtype == np.float64
    with pytest.raises(InputError, match="3 values for 2 layers"):
        Curve(["a", "b"], [1, 2, 3])


def test_make_provenance_records_everything():
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    p = provenance(created=when, image_sha256=["x", "y"], note="extra fact")
    assert p["tool"] == "fp" and p["tool_version"] == __version__
    assert p["created"] == "2026-01-02T03:04:05+00:00"
    assert p["inputs"] == {"manifest_sha256": "m" * 64, "n_images": 40,
                           "folder": "/data/suspect", "image_sha256": ["x", "y"]}
    assert p["encoder"] == {"name": "timm:tiny", "weights_sha256": "w" * 64}
    assert p["baseline"] == {"id": "b_1", "name": "base"}
    assert p["params"]["seed"] == 7 and p["params"]["proj"] == [1, 2]
    assert p["note"] == "extra fact"
    json.dumps(p, allow_nan=False)  # plain JSON types only
    now = datetime.fromisoformat(provenance()["created"])
    assert abs((datetime.now(UTC) - now).total_seconds()) < 60
    with pytest.raises(InputError, match="params"):
        provenance(params=[1, 2])


def test_to_dict_from_dict_round_trip_with_nan():
    c = Curve(LAYERS, [0.5, np.nan, -1.25], provenance())
    d = c.to_dict()
    assert d["values"] == [0.5, None, -1.25]
    back = Curve.from_dict(json.loads(json.dumps(d, allow_nan=False)))
    assert back.layers == LAYERS and back.provenance == c.provenance
    np.testing.assert_array_equal(back.values, c.values)
    with pytest.raises(InputError, match="layers"):
        Curve.from_dict({"values": [1]})


def test_to_row_enrolls_and_from_row_comes_back(tmp_path):
    from refbank import Bank

    bank = Bank(tmp_path / "bank")
    bank.add_baseline({"name": "base", "baseline_id": "b_1", "encoder": "timm:tiny",
                       "weights_sha256": "w" * 64, "layers": LAYERS,
                       "train_manifest_sha256": "t", "heldout_manifest_sha256": "p"})
    c = Curve(LAYERS, [0.1, 0.2, 0.3], provenance())
    [cid] = bank.add_curves([c.to_row(model="sd15", family="sd", checkpoint="v1-5")])
    row = bank.get_curve(cid)
    assert (row["model"], row["family"], row["checkpoint"], row["split"]) == (
        "sd15", "sd", "v1-5", "enroll")
    assert row["seed"] == 7 and row["tau"] == 0.2 and row["n_images"] == 40
    assert json.loads(row["params_json"]) == {"n_cells": 16, "proj": [1, 2]}
    back = Curve.from_row(row)
    np.testing.assert_array_equal(back.values, c.values)
    assert back.provenance["baseline"]["id"] == "b_1"
    assert back.provenance["params"] == c.provenance["params"]
    with pytest.raises(InputError, match="provenance"):
        Curve(LAYERS, [1, 2, 3]).to_row(model="m", family="f")
