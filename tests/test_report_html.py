"""The case report's HTML: the decision shown, provenance rendered generically, all escaped."""

from __future__ import annotations

from forensics.steps.report_html import LIST_SHOWN, nested, render
from forensics.steps.reports import Evidence


def _answer(unknown=False, **provenance):
    decision = {"family": None if unknown else "gan", "model": None if unknown else "sg2",
                "unknown": unknown, "score": 0.42, "threshold": 0.5, "nearest_family": "gan",
                "nearest_model": "sg2", "nearest_curve_id": "c_1", "reason": "because",
                "confidence": 0.87, "model_confidence": 0.5, "closest": "gan" if unknown else None,
                "consistent": [] if unknown else [{"model": "sg2", "family": "gan",
                                                   "p_value": 0.41}]}
    return {
        "decision": decision,
        "ranking": [{"rank": 1, "curve_id": "c_1", "model": "sg2", "family": "gan",
                     "score": 0.42}],
        "curve": {"layers": ["a", "b"], "values": [1.0, None]},
        "calibration": {"threshold": 0.5, "note": "threshold = 0.05-quantile of 9 scores"},
        "bootstrap": None,
        "belonging": [{"model": "sg2", "family": "gan", "p_value": 0.01 if unknown else 0.41,
                       "consistent": not unknown, "statistic": 0.1, "null_median": 0.05,
                       "n_images": 40, "n_curves": 2, "draws": 200, "kind": "mmd"}],
        "provenance": {"inputs": {"n_images": 40, "manifest_sha256": "f" * 64},
                       "attribution": {"fingerprint": "resid-early", "matcher": "zscore"},
                       **provenance},
    }


def test_the_decision_confidence_and_threshold_are_shown():
    text = render(_answer(), None, [])
    assert "Decision: family gan, model sg2" in text
    assert ">0.87<" in text and ">0.5<" in text and "resid-early" in text
    unknown = render(_answer(unknown=True), None, [])
    assert "Decision: UNKNOWN (closest family gan, not the decision)" in unknown
    assert 'class="decision unknown"' in unknown
    # both levels: the consistent models with their p-values, and the family
    assert "model level: consistent with" in text and "sg2 (gan, p 0.41)" in text
    assert "Model level: could an enrolled model have made them?" in text
    assert "<th>model level: consistent with</th><td>none</td>" in unknown
    assert "squared MMD (lower: closer)" in text  # what the statistic is
    probe = _answer()
    probe["belonging"][0]["kind"] = "probe"
    assert "mean log-probability (higher: closer)" in render(probe, None, [])


def test_any_provenance_field_is_rendered_as_nested_tables_and_escaped():
    custody = {"received_by": "<b>Ann</b>", "steps": [{"who": "lab & co", "at": "t1"}],
               "seals": list(range(LIST_SHOWN + 3))}
    text = render(_answer(custody=custody), None, [])
    assert "<th>custody</th>" in text and "<th>received_by</th>" in text
    assert "&lt;b&gt;Ann&lt;/b&gt;" in text and "<b>Ann</b>" not in text
    assert "lab &amp; co" in text
    assert "<details><summary>3 more</summary>" in text  # a long list is folded, not cut


def test_a_suspect_given_as_embeddings_has_no_thumbnails_but_says_why():
    text = render(_answer(), None, [], Evidence())
    assert "given as embeddings" in text and "<img" not in text


def test_nested_marks_hashes_and_empty_values():
    assert 'class="hash"' in nested("a" * 64)
    assert "(empty)" in nested({}) and "(none)" in nested([])
    assert nested(float("nan")) == "-" and nested(True) == "yes"
