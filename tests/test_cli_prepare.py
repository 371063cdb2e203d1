import re

import numpy as np
import pytest

from brain_diffuser_core.__main__ import build_parser, main
from nsd_fixtures import expected_arrays


def test_prepare_prints_a_summary_and_caches(nsd_tree, tmp_path, capsys):
    argv = ["prepare", "--nsd-root", str(nsd_tree.root), "--subject", str(nsd_tree.subject),
            "--sessions", "1-2", "--cache-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    expected = expected_arrays(nsd_tree, sessions=[1, 2])
    assert re.search(r"sessions used\s+2: 1, 2", out)
    assert re.search(rf"train images\s+{len(expected['train_image_ids'])}\n", out)
    assert re.search(rf"test images\s+{len(expected['test_image_ids'])}\n", out)
    assert re.search(rf"voxels\s+{int((nsd_tree.nsdgeneral > 0).sum())} ", out)
    assert "written" in out and re.search(r"peak RSS\s+\d+ MB", out)
    cache_dirs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(cache_dirs) == 1 and str(cache_dirs[0]) in out
    ids = np.load(cache_dirs[0] / "train_image_ids.npy")
    assert np.array_equal(ids, expected["train_image_ids"])
    assert main(argv) == 0
    assert "read from cache" in capsys.readouterr().out


def test_prepare_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["prepare", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--nsd-root", "--subject", "--sessions", "--cache-dir", "betas_sessionNN", "example"):
        assert needle in text


def test_prepare_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["prepare", "--nsd-root", str(tmp_path / "missing"), "--subject", "1"]) == 2
    assert "error: NSD root folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare", "--nsd-root", str(tmp_path), "--subject", "9"])
    assert main(["prepare", "--nsd-root", str(tmp_path), "--subject", "1", "--sessions", "x"]) == 2
    assert "'sessions' must look like" in capsys.readouterr().err
