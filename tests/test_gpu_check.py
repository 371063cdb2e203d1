"""benchmarks/gpu_check.py stays alive: its CPU mode runs the same three parts on tiny configs."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_its_tiny_cpu_version(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the script would run the real sizes (minutes), not its CPU version")
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "check.json"
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--cpu-steps", "2", "--batches", "1,2", "--repeats", "1", "--threads", "1",
                         "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert res["size"] == "tiny" and not res["skipped"]
    assert [(r["dtype"], r["batch"]) for r in res["rows"]] == [("float32", 1), ("float32", 2)]
    for r in res["rows"]:
        assert 0 < r["stage1"] < r["both"] and 0 < r["stage2"] < r["both"]
    assert res["diffusers"]["ratio"] > 0 and math.isfinite(res["diffusers"]["ratio"])
    assert set(res["ridge"]["fits"]) == {"vdvae", "clip_text", "clip_vision"}
    assert 0 < res["ridge"]["fraction_of_gemm"] and res["ridge"]["gemm_tflops"] > 0
    text = capsys.readouterr().out
    assert "diffusers" in text and "ridge, three decoders" in text and "say nothing about a GPU" in text
