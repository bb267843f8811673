"""The `train` benchmark (benchmarks/train.py): its FLOP counts against an
independent count from the layers' shapes, its phase accounting, ratios and JSON."""
from __future__ import annotations

import json

import torch
from torch import nn

from benchmarks import train as bench
from fr_distill.models import get_backbone

TINY = ["--student", "iresnet18", "--width", "0.25", "--embedding-dim", "32",
        "--classes", "16", "--amp", "fp32", "--device", "cpu"]


def layer_flops(model: nn.Module, images: torch.Tensor) -> float:
    """2 × multiply-adds of every Conv2d and Linear, from their shapes (forward hooks)."""
    total = 0.0

    def conv(m: nn.Conv2d, _, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total += 2.0 * k * out.numel()

    def linear(m: nn.Linear, _, out):
        nonlocal total
        total += 2.0 * m.in_features * out.numel()

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(images)
    for h in hooks:
        h.remove()
    return total


def test_flop_counts_match_the_layer_shapes():
    args = bench.parse_args(TINY + ["--teacher", "iresnet34"])
    models = bench.build_models(args, torch.device("cpu"), compiled=False)
    distill = bench.count_step_flops(models, args, torch.device("cpu"), distill=True)
    plain = bench.count_step_flops(models, args, torch.device("cpu"), distill=False)
    images = torch.zeros(1, 3, 112, 112)
    teacher = layer_flops(get_backbone("iresnet34", 32, width=0.25), images) / 1e9
    student = layer_flops(get_backbone("iresnet18", 32, width=0.25), images) / 1e9
    assert abs(distill["teacher_fwd"] - teacher) < 1e-9 * teacher
    assert abs(distill["student_fwd"] - student) < 1e-9 * student
    assert plain["teacher_fwd"] == 0
    # backward ≈ 2 × forward (less the unneeded input gradient of the first conv), plus the head
    assert 2.7 * student < plain["step"] < 3.1 * student
    assert abs(distill["step"] - plain["step"] - teacher) < 0.02 * teacher + 1e-4


def test_peak_by_device_name():
    assert bench.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert bench.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") is None


def test_main_reports_phases_ratios_and_json(tmp_path, capsys):
    out = tmp_path / "train.json"
    report = bench.main(TINY + ["--teacher", "iresnet18", "--batch", "4", "--steps", "2",
                                "--warmup", "0",
                                "--peak-tflops", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"plain", "distill"}
    for r in rows.values():
        assert set(r["phases_ms"]) == set(bench.PHASES)
        assert all(0 <= ms <= r["step_ms"] for ms in r["phases_ms"].values())  # inside the step
        assert abs(r["images_per_s"] - 4 * 1000 / r["step_ms"]) < 1e-6 * r["images_per_s"]
        assert abs(r["peak_share"] - r["step_gflop_per_image"] * r["images_per_s"] / 1000) < 1e-12
    assert rows["plain"]["phases_ms"]["teacher"] == 0 and rows["distill"]["phases_ms"]["teacher"] > 0
    assert rows["distill"]["step_gflop_per_image"] > rows["plain"]["step_gflop_per_image"]
    table = capsys.readouterr().out
    assert "distillation adds" in table and "x plain" in table


def test_cache_variant_reads_rows_and_reports_the_flop_bound(tmp_path, capsys):
    """``--cache``: a third variant whose step reads the teacher's rows from a teacher cache
    (no teacher forward), its FLOPs those of distill less the teacher's, and the speed-up
    over distill next to the FLOP bound."""
    report = bench.main(TINY + ["--teacher", "iresnet18", "--batch", "4", "--steps", "2",
                                "--warmup", "0", "--cache", "--cache-dir", str(tmp_path)])
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"plain", "distill", "cached"}
    flops = report["gflop_per_image"]
    assert flops["cached"]["step"] == flops["distill"]["step"] - flops["distill"]["teacher_fwd"]
    assert rows["cached"]["phases_ms"]["teacher"] < rows["distill"]["phases_ms"]["teacher"]
    (gain,) = report["teacher_cache"]
    assert gain["bound"] == flops["distill"]["step"] / flops["cached"]["step"]
    assert gain["speedup"] == rows["distill"]["step_ms"] / rows["cached"]["step_ms"]
    assert (tmp_path / "embeddings.bin").stat().st_size == 4 * 4 * 32 * 2  # 4 batches of 4, fp16
    assert "teacher cache speed-up" in capsys.readouterr().out
