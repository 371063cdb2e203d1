"""Mean over subjects of the evaluate table, and the --subject list of the evaluate command."""
import json

import pytest

from brain_diffuser_core.cli.evaluate import _subjects
from brain_diffuser_core.evaluation import mean_over_subjects, write_subject_mean


def _summ(a: float, b: float) -> dict:
    return {"full": {"PixCorr": a, "CLIP": b}, "stage1": {"PixCorr": a + 0.1, "CLIP": b - 0.1}}


def test_mean_over_subjects_and_table(tmp_path):
    summaries = {1: _summ(0.2, 0.9), 2: _summ(0.4, 0.7), 5: _summ(0.0, 0.8)}
    mean = mean_over_subjects(summaries)
    assert mean["full"]["PixCorr"] == pytest.approx((0.2 + 0.4 + 0.0) / 3)
    assert mean["stage1"]["CLIP"] == pytest.approx((0.8 + 0.6 + 0.7) / 3)
    write_subject_mean(tmp_path, summaries)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["subjects"] == [1, 2, 5] and saved["mean"] == mean
    table = (tmp_path / "table.md").read_text()
    assert "ours (full) subj 2" in table and "ours (stage1) mean subj 1,2,5" in table
    assert "Brain-Diffuser (published)" in table


def test_mean_over_subjects_rejects_mismatched_metrics():
    bad = {1: _summ(0.2, 0.9), 2: {"full": {"PixCorr": 0.1}, "stage1": {"PixCorr": 0.1, "CLIP": 0.5}}}
    with pytest.raises(ValueError, match="subject 2"):
        mean_over_subjects(bad)
    with pytest.raises(ValueError, match="at least one subject"):
        mean_over_subjects({})


def test_subject_list_parsing():
    assert _subjects("all", (7, 1, 2)) == [1, 2, 7]
    assert _subjects("2,1,2", (1, 2)) == [2, 1]
    with pytest.raises(SystemExit, match="has no decoders for subject"):
        _subjects("5", (1, 2))
    with pytest.raises(SystemExit, match="comma list"):
        _subjects("x", (1,))
    with pytest.raises(SystemExit, match="comma list"):
        _subjects("9", (1,))
