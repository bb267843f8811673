"""Checks that need a CUDA GPU, run by ``tools/gpu_check.sh``: DALI ``mixed`` (nvJPEG) decode
in the training loader and DALI ``warp_affine`` against the project's CPU paths, the frozen
teacher under bf16/fp16 autocast, the teacher cache's rows on the GPU (pinned host and device
memory), an NCCL process group with DDP, a compiled training step, and a short training run of
``launch/train.py`` on the GPU."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO, run_torchrun_gpu, smooth_face_like, write_jpeg_folder
from benchmarks.train import calibrate_batchnorm, loss_config
from fr_distill.config import DataConfig, OptimConfig
from fr_distill.data import build_train_loader, preflight
from fr_distill.data.align import ARCFACE_TEMPLATE, align_face, alignment_matrix
from fr_distill.engine.optim import build_optimizer
from fr_distill.losses import build_objective
from fr_distill.models import get_backbone, load_frozen_model
from fr_distill.precision import autocast

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


def test_dali_mixed_decode_matches_the_cpu_loader(tmp_path):
    root = write_jpeg_folder(tmp_path / "faces", num_classes=4, per_class=8)
    dali_cfg = DataConfig(train=str(root), loader="dali", batch_size=8, num_workers=2)
    cpu_cfg = DataConfig(train=str(root), loader="torch", batch_size=8, num_workers=0)
    info = preflight(dali_cfg)
    on_gpu = build_train_loader(dali_cfg, info, 0, 1, CUDA, seed=0).iterate(0)
    on_cpu = build_train_loader(cpu_cfg, info, 0, 1, torch.device("cpu"), seed=0).iterate(0)
    for _ in range(3):  # same samples, same flips; nvJPEG vs libjpeg differ by about a level
        gpu, cpu = next(on_gpu), next(on_cpu)
        assert gpu.images.device == CUDA and gpu.images.dtype == torch.float32
        assert gpu.images.shape == (8, 3, 112, 112)
        assert torch.equal(gpu.indices.cpu(), cpu.indices.cpu())
        assert torch.equal(gpu.labels.cpu(), cpu.labels.cpu())
        diff = (gpu.images.cpu() - cpu.images).abs()
        assert diff.mean().item() < 0.02 and diff.max().item() < 0.15, (diff.mean(), diff.max())


def test_dali_warp_affine_matches_the_project_alignment():
    from nvidia.dali import fn, pipeline_def, types

    image = smooth_face_like(200, 180, seed=3)
    angle = np.deg2rad(12.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (ARCFACE_TEMPLATE - 56.0) @ rotation.T * 1.3 + np.array([90.0, 100.0])
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95, subsampling=0)
    encoded = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    decoded_on_cpu = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    reference = align_face(decoded_on_cpu, landmarks)  # the project's CPU path (METHOD V2)
    matrix = alignment_matrix(landmarks, 112).astype(np.float32).reshape(-1).tolist()

    @pipeline_def(batch_size=1, num_threads=1, device_id=0)
    def pipeline():
        jpeg = fn.external_source(name="jpeg", dtype=types.UINT8)
        decoded = fn.decoders.image(jpeg, device="mixed", output_type=types.RGB)
        return fn.warp_affine(decoded, matrix=matrix, size=[112, 112], inverse_map=False,
                              fill_value=0, interp_type=types.INTERP_LINEAR)

    pipe = pipeline()
    pipe.build()
    pipe.feed_input("jpeg", [encoded])
    (aligned,) = pipe.run()
    out = np.asarray(aligned.as_cpu().as_array()[0])
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(np.int16) - reference.astype(np.int16))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 8, (diff.mean(), diff.max())


def test_teacher_forward_under_bf16_and_fp16_matches_fp32(tmp_path):
    torch.manual_seed(0)
    backbone = calibrate_batchnorm(get_backbone("iresnet100", 512).to(CUDA),
                                   torch.rand(16, 3, 112, 112, device=CUDA) * 2 - 1)
    path = tmp_path / "r100.pth"
    torch.save(backbone.state_dict(), path)
    teacher = load_frozen_model(str(path), "iresnet100", 512, 1.0, device=CUDA)
    teacher = teacher.to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = (torch.rand(32, 3, 112, 112, device=CUDA) * 2 - 1).contiguous(
        memory_format=torch.channels_last)
    torch.backends.cudnn.allow_tf32 = False
    try:
        reference = teacher(images)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    for dtype in (torch.bfloat16, torch.float16):
        with autocast(CUDA, dtype):
            out = teacher(images)
        assert out.dtype == torch.float32 and out.device == CUDA and torch.isfinite(out).all()
        cosine = F.cosine_similarity(out, reference)
        assert cosine.min().item() > 0.99, (dtype, cosine.min())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_cache_rows_from_pinned_host_and_device_memory(tmp_path):
    """``teacher.cache_placement`` host (pinned copies) and device give the stored rows as
    float32 on the GPU for any indices and flips; auto puts a small cache in device memory."""
    from fr_distill.teacher_cache import TeacherCache
    from fr_distill.teacher_cache.store import ROWS_FILE

    rows = np.random.default_rng(0).standard_normal((50, 2, 16)).astype(np.float16)
    rows.tofile(tmp_path / ROWS_FILE)
    manifest = {"identity": {"data": {"num_samples": 50}, "dtype": "float16"},
                "flips": [False, True], "embedding_dim": 16}
    indices, flips = torch.tensor([3, 49, 0, 3]), torch.tensor([True, False, False, False])
    expected = torch.from_numpy(rows[indices.numpy(), flips.long().numpy()].astype(np.float32))
    for placement in ("host", "device", "auto"):
        cache = TeacherCache(tmp_path, manifest, CUDA, placement)
        out = cache.lookup(indices, flips)
        assert out.device == CUDA and out.dtype == torch.float32
        assert torch.equal(out.cpu(), expected), placement
    assert TeacherCache(tmp_path, manifest, CUDA, "auto").placement == "device"


def test_nccl_process_group_and_ddp_on_one_gpu():
    proc = run_torchrun_gpu(REPO / "tests_gpu" / "workers" / "worker_nccl.py", nproc=1)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["backend"] == "nccl" and report["world_size"] == 1


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    eager = get_backbone("iresnet18", 512, width=0.5).to(CUDA, memory_format=torch.channels_last)
    compiled_copy = get_backbone("iresnet18", 512, width=0.5).to(
        CUDA, memory_format=torch.channels_last)
    compiled_copy.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_copy)
    images = (torch.rand(32, 3, 112, 112, device=CUDA) * 2 - 1).contiguous(
        memory_format=torch.channels_last)
    labels = torch.arange(32, device=CUDA) % 16
    losses, grads = [], []
    for model, params in ((eager, eager), (compiled, compiled_copy)):
        torch.manual_seed(1)
        objective = build_objective(loss_config(False), 16, 512, 512, 32, device=CUDA)
        optimizer = build_optimizer(list(params.parameters()) + objective.replicated_parameters(),
                                    OptimConfig(), lr=0.01)
        with autocast(CUDA, torch.bfloat16):
            f_s = model(images)
        loss = objective(f_s.float(), None, labels).total
        loss.backward()
        grads.append(params.fc.weight.grad.detach().clone())
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and abs(losses[0] - losses[1]) < 2e-2 * abs(losses[0])
    assert F.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0).item() > 0.98


def test_training_run_on_the_gpu_with_dali(tmp_path):
    root = write_jpeg_folder(tmp_path / "faces", num_classes=8, per_class=8)
    torch.manual_seed(0)
    teacher = calibrate_batchnorm(get_backbone("iresnet50", 128, width=0.5),
                                  torch.rand(16, 3, 112, 112) * 2 - 1)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    config = tmp_path / "gpu.yaml"
    config.write_text(f"""
model: {{name: iresnet18, embedding_dim: 128, width: 0.5}}
teacher: {{path: {tmp_path}/teacher.pth, name: iresnet50, embedding_dim: 128, width: 0.5}}
data: {{train: {root}, loader: dali, batch_size: 16, num_workers: 2}}
schedule: {{total_steps: 6, milestones: [4]}}
precision: {{amp: bf16}}
checkpoint: {{every_steps: 3}}
logging: {{every_steps: 1, tensorboard: false, progress_bar: never}}
distributed: {{backend: nccl, device: cuda}}
run: {{output_dir: {tmp_path}/run}}
""")
    run_torchrun_gpu(REPO / "launch" / "train.py", "--config", config, nproc=1)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values() if v.is_floating_point())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines if '"step"' in line]
    assert [m["step"] for m in metrics][-6:] == [1, 2, 3, 4, 5, 6]
    for m in metrics:
        assert all(np.isfinite(m[k]) for k in ("sphereface2", "iled", "rpsd", "total"))
        assert m["skipped_steps"] == 0
