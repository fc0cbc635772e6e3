"""Calibrations stored beside the bank: keyed by content, read back bit for bit, checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forensics.errors import FpWarning
from forensics.stats.answer_confidence import AnswerConfidence
from forensics.stats.confidence import ConfidenceModel
from forensics.steps.calibration import CalibrationStore, calibration_key, rows_digest


def _value(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"nulls": rng.normal(size=7).tolist(), "third": 1 / 3}


def test_computed_once_stored_and_read_back_identically(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return _value()

    ident = (lambda v: v, lambda v: v)
    one = CalibrationStore(tmp_path)
    v1, r1 = one.get("belonging", {"n": 16}, compute, *ident)
    v1b, _ = one.get("belonging", {"n": 16}, compute, *ident)  # this process: memory
    v2, r2 = CalibrationStore(tmp_path).get("belonging", {"n": 16}, compute, *ident)
    assert calls == [1] and v1 == v1b == v2 and r1 == r2  # bit-identical floats
    assert (tmp_path / "calibration" / f"belonging-{r1['key']}.json").is_file()
    _v3, r3 = CalibrationStore(tmp_path).get("belonging", {"n": 17}, compute, *ident)
    assert calls == [1, 1] and r3["key"] != r1["key"]  # another size: another key
    CalibrationStore(tmp_path, enabled=False).get("belonging", {"n": 16}, compute, *ident)
    assert calls == [1, 1, 1]  # disabled: computed, never read


def test_a_file_that_fails_its_hash_is_set_aside_and_recomputed(tmp_path):
    ident = (lambda v: v, lambda v: v)
    _v, rec = CalibrationStore(tmp_path).get("confidence", {"a": 1}, _value, *ident)
    path = tmp_path / "calibration" / f"confidence-{rec['key']}.json"
    doc = json.loads(path.read_text())
    doc["value"]["third"] = 0.5
    path.write_text(json.dumps(doc))
    with pytest.warns(FpWarning, match="does not match its content"):
        v, rec2 = CalibrationStore(tmp_path).get("confidence", {"a": 1}, _value, *ident)
    assert v == _value() and rec2 == rec
    assert (path.parent / f"damaged-{path.name}").is_file()
    path.write_text("{not json")
    with pytest.warns(FpWarning, match="cannot be read"):
        CalibrationStore(tmp_path).get("confidence", {"a": 1}, _value, *ident)


def test_a_bank_that_cannot_be_written_stores_in_the_user_cache(tmp_path, monkeypatch):
    from forensics.steps import calibration

    bank = tmp_path / "bank"
    bank.mkdir()
    monkeypatch.setattr(calibration.os, "access", lambda path, mode: False)  # read-only
    monkeypatch.setenv("FP_CACHE_DIR", str(tmp_path / "cache"))
    _v, rec = CalibrationStore(bank).get("x", {}, _value, lambda v: v, lambda v: v)
    assert (tmp_path / "cache" / "calibration" / f"x-{rec['key']}.json").is_file()
    assert not (bank / "calibration").exists()


def test_a_new_bank_state_deletes_the_files_of_the_baselines_earlier_states(tmp_path):
    ident = (lambda v: v, lambda v: v)
    root = tmp_path / "calibration"
    old = CalibrationStore(tmp_path, scope="b_1", state="s1")
    old.get("confidence", {"a": 1}, _value, *ident)
    old.get_arrays("vectors", {"a": 1}, lambda: {"x": np.arange(3.0)})
    other = CalibrationStore(tmp_path, scope="b_2", state="s9")  # another baseline
    other.get("confidence", {"a": 1}, _value, *ident)
    (root / ("confidence-" + "0" * 64 + ".json")).write_text("{}")  # an earlier format's
    assert sorted(p.name for p in (root / "b_1" / "s1").iterdir())[0].startswith("confidence-")
    # reading the old state again deletes nothing
    again = CalibrationStore(tmp_path, scope="b_1", state="s1")
    again.get("confidence", {"a": 1}, lambda: pytest.fail("recomputed"), *ident)
    assert (root / "b_1" / "s1").is_dir()
    new = CalibrationStore(tmp_path, scope="b_1", state="s2")  # the bank changed
    new.get("confidence", {"a": 2}, _value, *ident)
    assert [p.name for p in (root / "b_1").iterdir()] == ["s2"]
    assert (root / "b_2" / "s9").is_dir()  # another baseline's state is kept
    assert not any(p.is_file() for p in root.iterdir())  # the flat file of an old format
    with pytest.raises(ValueError, match="plain names"):
        CalibrationStore(tmp_path, scope="../x", state="s")


def test_a_store_without_a_scope_prunes_nothing_wherever_the_bank_lies(tmp_path):
    """A bank inside a folder named like the store: an unscoped store writes beside the
    bank's own folders and deletes none of them."""
    bank = tmp_path / "calibration" / "bank"
    (bank / "rows").mkdir(parents=True)
    (bank / "baselines" / "b_1").mkdir(parents=True)
    CalibrationStore(bank).get("confidence", {"a": 1}, _value, lambda v: v, lambda v: v)
    assert (bank / "rows").is_dir() and (bank / "baselines" / "b_1").is_dir()


def test_keys_follow_the_rows_and_the_parameters():
    rows = [{"curve_id": "c1", "row_sha256": "a"}, {"curve_id": "c2", "row_sha256": "b"}]
    edited = [rows[0], {"curve_id": "c2", "row_sha256": "c"}]
    assert rows_digest(rows) != rows_digest(edited) != rows_digest(rows[:1])
    assert calibration_key("k", {"rows": rows_digest(rows), "seed": 0}) != calibration_key(
        "k", {"rows": rows_digest(rows), "seed": 1})


def test_the_fitted_calibrations_round_trip_through_json_exactly():
    model = ConfidenceModel(weights=(0.1, -2 / 3, 1e-17, 3.0), thresholds={16: 0.7, 64: 1 / 7},
                            quantile=0.05, n_draws=120, sim_accuracy=0.81, seed=3, note="n",
                            margin_thresholds={16: 0.01, 64: 0.2})
    back = ConfidenceModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert back == model
    assert back.probability(0.3, 0.9, 40) == model.probability(0.3, 0.9, 40)
    ans = AnswerConfidence(64, 0.9, (0.5, -1 / 3, 0.25), 10, 6, 0.7, 0)
    assert AnswerConfidence.from_dict(json.loads(json.dumps(ans.to_dict()))) == ans
    none = AnswerConfidence(64, None, None, 0, 0, None, 0)
    assert AnswerConfidence.from_dict(json.loads(json.dumps(none.to_dict()))) == none
