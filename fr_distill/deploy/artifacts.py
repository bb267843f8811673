"""The deployment files of a student: how each is written and how it is run.

=============  ========================  =========  ===========================================
format         file                      precision  runs in
=============  ========================  =========  ===========================================
state-dict     backbone.pth              float32    torch (eager), InsightFace's layout
onnx-fp32      backbone.onnx             float32    onnxruntime
onnx-fp16      backbone_fp16.onnx        float16    onnxruntime; float32 input and output
torchscript    backbone_torchscript.pt   float32    torch.jit (traced)
=============  ========================  =========  ===========================================

Every file takes ``(pixels - 127.5) / 127.5`` as float32 ``[B,3,112,112]`` RGB with a dynamic
batch axis and returns the ``[B,D]`` embedding. The float16 ONNX file is the float32 export
converted by onnxruntime's float16 converter with ``keep_io_types``: weights and activations in
float16, Cast nodes at the input and output, so loaders that feed float32 (InsightFace's) work
unchanged. ONNX input ``input``, output ``embedding`` (:func:`fr_distill.models.export.export_onnx`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from fr_distill.models.export import export_onnx
from fr_distill.models.weights import load_strict

#: InsightFace's ArcFaceONNX looks for normalization among the first 8 nodes by their names.
INSIGHTFACE_SCAN_NODES = 8
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


@dataclass(frozen=True)
class Format:
    """One kind of deployment file."""

    name: str
    file: str
    precision: str  # "fp32" or "fp16": selects the verification bounds
    runtime: str
    packages: tuple[str, ...] = ()

    def missing_packages(self) -> list[str]:
        return [p for p in self.packages if importlib.util.find_spec(p) is None]


STATE_DICT = Format("state-dict", "backbone.pth", "fp32", "torch (eager)")
FORMATS = {f.name: f for f in (
    Format("onnx-fp32", "backbone.onnx", "fp32", "onnxruntime", ONNX_PACKAGES),
    Format("onnx-fp16", "backbone_fp16.onnx", "fp16", "onnxruntime", ONNX_PACKAGES),
    Format("torchscript", "backbone_torchscript.pt", "fp32", "torch.jit"),
)}
"""The formats ``--formats`` chooses from; ``backbone.pth`` is always written."""


def write_state_dict(model: nn.Module, path: Path) -> None:
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    torch.save(state, path)


def write_onnx_fp32(model: nn.Module, path: Path) -> None:
    export_onnx(model, path)


def write_onnx_fp16(model: nn.Module, path: Path) -> None:
    """The float32 export converted to float16 with float32 input and output; the float32 file
    written beside ``path`` by :func:`write_onnx_fp32` is converted when it is there."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    float32_path = path.with_name(FORMATS["onnx-fp32"].file)
    scratch = not float32_path.exists()
    if scratch:
        float32_path = path.with_name(f"{path.name}.float32")
        export_onnx(model, float32_path)
    onnx.save(convert_float_to_float16(onnx.load(str(float32_path)), keep_io_types=True), str(path))
    if scratch:
        float32_path.unlink()


@contextlib.contextmanager
def _torchscript_quietly():
    """torch marks TorchScript deprecated (a FutureWarning per call); it is still what many
    serving stacks load, so the warning is not repeated to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def write_torchscript(model: nn.Module, path: Path) -> None:
    example = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _torchscript_quietly():
        torch.jit.save(torch.jit.trace(model, example), str(path))


WRITERS: dict[str, Callable[[nn.Module, Path], None]] = {
    "state-dict": write_state_dict, "onnx-fp32": write_onnx_fp32,
    "onnx-fp16": write_onnx_fp16, "torchscript": write_torchscript}


class OnnxEmbedder(nn.Module):
    """An ONNX file run as InsightFace runs it: a plain onnxruntime session fed float32 numpy
    (``session.run``), with ``threads`` intra-op threads (0: onnxruntime's default)."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy().astype(np.float32, copy=False)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def load_artifact(fmt: Format, path: Path, fresh_student: Callable[[], nn.Module],
                  threads: int = 0) -> nn.Module:
    """The written file ``path`` of ``fmt`` loaded back as a float32-in, float32-out module:
    the state dict strictly into ``fresh_student()``, TorchScript with ``torch.jit.load``, ONNX
    in an onnxruntime session."""
    if fmt.name == "state-dict":
        model = fresh_student()
        load_strict(model, torch.load(path, map_location="cpu", weights_only=True), str(path),
                    "the exported state dict")
        return model.eval()
    if fmt.name == "torchscript":
        with _torchscript_quietly():
            return torch.jit.load(str(path), map_location="cpu").eval()
    return OnnxEmbedder(path, threads)


def insightface_input(path: Path) -> tuple[float, float]:
    """``(input_mean, input_std)`` InsightFace's ArcFaceONNX would use for the ONNX file at
    ``path``: ``(0, 1)`` (raw pixels) when one of the first 8 node names starts with ``Sub`` or
    ``_minus`` and one with ``Mul`` or ``_mul``, else ``(127.5, 127.5)``."""
    import onnx

    names = [node.name for node in onnx.load(str(path)).graph.node[:INSIGHTFACE_SCAN_NODES]]
    subtracts = any(n.startswith(("Sub", "_minus")) for n in names)
    multiplies = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if subtracts and multiplies else (127.5, 127.5)
