"""``vdu.bench``'s accelerator run (``python -m vdu.bench --device cuda``), exercised on the CPU with a tiny
batch: both precisions measured, the ratios to the CPU file computed from the numbers it wrote, a clear
refusal where the device does not exist."""
import json
import subprocess
import sys

import pytest
import torch

from vdu import bench


def test_the_accelerator_run_measures_both_precisions_and_compares_with_the_cpu_file(tmp_path):
    cpu = {"machine": "a CPU", "batch": 4, "train_img_per_s": 2.0, "ddim_img_steps_per_s": 4.0,
           "nll_img_terms_per_s": 8.0, "evaluator_img_per_s": 16.0}
    (tmp_path / "bench.json").write_text(json.dumps(cpu))
    out = bench.accelerator("mnist", "cpu", batches=(4,), repeats=1, quality_samples=0,
                            cpu_file=tmp_path / "bench.json")
    assert set(out["runs"]) == {"batch4_fp32", "batch4_bf16"}
    assert out["runs"]["batch4_bf16"]["precision"] == "bfloat16 autocast"
    fp32 = out["runs"]["batch4_fp32"]
    for k in bench.THROUGHPUTS:
        assert fp32[k] > 0
        assert out["vs_cpu"][k] == round(fp32[k] / cpu[k], 1)
    assert out["card"]["device"] == "cpu" and out["card"]["torch"] == torch.__version__
    # a CPU file measured at another batch gives no ratio rather than a wrong one
    (tmp_path / "bench.json").write_text(json.dumps({**cpu, "batch": 64}))
    assert "vs_cpu" not in bench.accelerator("mnist", "cpu", batches=(4,), repeats=1, quality_samples=0,
                                             cpu_file=tmp_path / "bench.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_refused():
    r = subprocess.run([sys.executable, "-m", "vdu.bench", "--device", "cuda"], capture_output=True, text=True)
    assert r.returncode != 0 and "no CUDA device" in r.stderr
