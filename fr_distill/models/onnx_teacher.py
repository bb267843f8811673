"""ONNX teachers: onnx2torch conversion verified against onnxruntime, else onnxruntime itself.

InsightFace's model zoo ships ONNX only. A converted torch module runs under ``torch.autocast``
and ``torch.compile`` like any other teacher, but conversion is fragile (unsupported op
versions, attributes such as ``Reshape(allowzero=1)``), so it is accepted only when it
reproduces onnxruntime's output on a probe batch (relative error ≤ 1e-4, on the CPU in
float32). Otherwise the teacher runs in onnxruntime (CUDA execution provider on CUDA devices),
with inputs and outputs bound to torch memory through IO binding so no host copies are made.
``onnx_backend``: ``auto`` (convert if verified, else onnxruntime), ``torch`` (conversion
required), ``onnxruntime``. Which path was taken is logged on the ``fr_distill`` logger.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fr_distill.models.errors import ModelLoadError

logger = logging.getLogger("fr_distill")

ONNX_BACKENDS = ("auto", "torch", "onnxruntime")
ONNX2TORCH_OPSET = 17  # newest opset whose op versions onnx2torch 1.5 implements throughout
VERIFY_RTOL = 1e-4
PROBE_BATCH = 2
DEFAULT_IMAGE_SIZE = 112


@dataclass(frozen=True)
class OnnxInputSpec:
    """The single data input of an ONNX model: name, fixed batch (None if dynamic), NCHW size."""

    name: str
    output_name: str
    batch: int | None
    shape_chw: tuple[int, int, int]
    dtype: torch.dtype


def _static_dim(dim, default: int | None) -> int | None:
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else default


def read_input_spec(model, path: str) -> OnnxInputSpec:
    """The data input of ``model``: graph inputs that are not initializers (exports made with
    ``keep_initializers_as_inputs=True`` list every weight as an input too)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or not model.graph.output:
        raise ModelLoadError(f"{path}: an ONNX teacher needs exactly one image input and an "
                             f"output, found inputs {[i.name for i in inputs]}")
    tensor_type = inputs[0].type.tensor_type
    dims = list(tensor_type.shape.dim)
    if len(dims) != 4:
        raise ModelLoadError(f"{path}: ONNX input {inputs[0].name!r} has rank {len(dims)}, "
                             "expected [B,3,H,W]")
    chw = tuple(_static_dim(d, default) for d, default in
                zip(dims[1:], (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)))
    dtype = torch.from_numpy(np.zeros(0, tensor_dtype_to_np_dtype(tensor_type.elem_type))).dtype
    return OnnxInputSpec(inputs[0].name, model.graph.output[0].name,
                         _static_dim(dims[0], None), chw, dtype)


def ort_session(path: str, device: torch.device):
    """An onnxruntime session on ``device`` (CUDA execution provider when available)."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}),
                         "CPUExecutionProvider"]
        else:
            logger.warning("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); "
                           "the ONNX teacher %s runs on the CPU", path)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: exports listing weights as inputs warn per weight
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for invalid models
        raise ModelLoadError(f"onnxruntime cannot load {path}: "
                             f"{str(err).splitlines()[0][:300]}") from None


class OnnxRuntimeModule(nn.Module):
    """Runs an onnxruntime session on torch tensors, binding input and output memory directly
    (IO binding on the tensor's device: no host round trip on CUDA, no copy on the CPU)."""

    def __init__(self, session, spec: OnnxInputSpec, output_dim: int, output_dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.session = session
        self.spec = spec
        self.output_dim = output_dim
        self.output_dtype = output_dtype
        on_cuda = device.type == "cuda" and "CUDAExecutionProvider" in session.get_providers()
        self.run_device = device if on_cuda else torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_device = x.device
        x = x.to(self.run_device, self.spec.dtype).contiguous()
        out = torch.empty((x.shape[0], self.output_dim), dtype=self.output_dtype,
                          device=self.run_device)
        kind, index = self.run_device.type, self.run_device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(self.spec.name, kind, index, _numpy_dtype(self.spec.dtype),
                           tuple(x.shape), x.data_ptr())
        binding.bind_output(self.spec.output_name, kind, index, _numpy_dtype(self.output_dtype),
                            tuple(out.shape), out.data_ptr())
        if kind == "cuda":  # x must be fully written before onnxruntime's stream reads it
            torch.cuda.current_stream(self.run_device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out.to(out_device, torch.float32)


class OnnxInputAdapter(nn.Module):
    """Feeds an ONNX-derived model the input it was exported for: casts to the graph's input
    dtype and, for a model exported with a fixed batch size, splits the batch into chunks of
    that size (zero-padding the last) and concatenates the outputs. Eval-mode face models treat
    samples independently, so padding does not change any real sample's embedding."""

    def __init__(self, model: nn.Module, spec: OnnxInputSpec) -> None:
        super().__init__()
        self.model = model
        self.batch = spec.batch
        self.dtype = spec.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.batch is None:
            return self.model(x)
        outputs = []
        for chunk in x.split(self.batch):
            real = chunk.shape[0]
            if real < self.batch:
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch - real, *chunk.shape[1:]))])
            outputs.append(self.model(chunk)[:real])
        return torch.cat(outputs)


#: The input fr_distill feeds every model: ``(pixels - 127.5) / 127.5``.
PIPELINE_MEAN, PIPELINE_STD = 127.5, 127.5
#: How far into the graph (nodes before the first convolution, at most) normalization is sought.
NORMALIZATION_SEARCH = 8


def input_convention(model) -> tuple[float, float, str]:
    """``(mean, std, reason)`` of the input an ONNX face model expects, ``(pixels - mean) / std``.

    InsightFace's model zoo holds both kinds: graphs that begin with their own subtraction and
    scaling (``Sub`` then ``Mul``/``Div``, as InsightFace's loader detects them) take raw 0–255
    pixels; the others take ``(pixels - 127.5) / 127.5``."""
    ops = []
    for node in model.graph.node[:NORMALIZATION_SEARCH]:
        if node.op_type == "Conv":
            break
        ops.append(node.op_type)
    if "Sub" in ops and ("Mul" in ops or "Div" in ops):
        return 0.0, 1.0, (f"the graph normalizes its input itself ({', '.join(ops)} before the "
                          f"first Conv): raw 0-255 pixels")
    return PIPELINE_MEAN, PIPELINE_STD, ("no Sub and Mul/Div before the first Conv: "
                                         "(pixels - 127.5) / 127.5")


class InputNormalization(nn.Module):
    """Maps the pipeline's input ``(p - 127.5) / 127.5`` to ``(p - mean) / std`` for a model
    that expects another normalization (an affine map, in float32)."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.float() * PIPELINE_STD + PIPELINE_MEAN
        return self.model((pixels - self.mean) / self.std)


def _numpy_dtype(dtype: torch.dtype) -> type:
    return torch.empty(0, dtype=dtype).numpy().dtype.type


def _fix_reshape_allowzero(model) -> None:
    """Set ``allowzero=0`` on Reshape nodes whose constant target shape has no zero (where the
    flag cannot change the result); onnx2torch rejects ``allowzero=1``."""
    from onnx import numpy_helper

    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in constants:
            continue
        if 0 in numpy_helper.to_array(constants[node.input[1]]).tolist():
            continue
        for attribute in node.attribute:
            if attribute.name == "allowzero":
                attribute.i = 0


def convert_with_onnx2torch(model) -> nn.Module:
    """Convert with onnx2torch after normalising what it cannot read: op versions newer than
    opset 17 (semantically unchanged for float graphs) and redundant ``allowzero`` flags."""
    import onnx2torch
    from onnx import version_converter

    model = copy.deepcopy(model)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > ONNX2TORCH_OPSET:
        model = version_converter.convert_version(model, ONNX2TORCH_OPSET)
    _fix_reshape_allowzero(model)
    return onnx2torch.convert(model)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return ((actual.float() - expected.float()).abs().max() / scale).item()


def load_onnx_teacher(path: str, device: torch.device, backend: str = "auto"
                      ) -> tuple[nn.Module, str, int, tuple[float, float, str]]:
    """Load the ONNX teacher at ``path``; returns (module, backend taken, embedding dim, the
    input convention of :func:`input_convention`).

    The backend taken is ``"onnx2torch"`` or ``"onnxruntime"``.
    """
    import onnx

    try:
        model = onnx.load(path)
    except Exception as err:  # protobuf DecodeError, missing external data files
        raise ModelLoadError(f"{path} is neither a torch/TorchScript file nor a valid ONNX model: "
                             f"{str(err).splitlines()[0][:300]}") from None
    if not model.graph.node:
        raise ModelLoadError(f"{path} is neither a torch/TorchScript file nor a valid ONNX model: "
                             "no graph nodes")
    spec = read_input_spec(model, path)
    convention = input_convention(model)
    cpu_session = ort_session(path, torch.device("cpu"))
    probe = torch.randn((spec.batch or PROBE_BATCH, *spec.shape_chw),
                        generator=torch.Generator().manual_seed(0)).to(spec.dtype)
    expected = torch.from_numpy(cpu_session.run([spec.output_name],
                                                {spec.name: probe.numpy()})[0])
    if expected.ndim != 2 or expected.shape[0] != probe.shape[0]:
        raise ModelLoadError(f"{path}: ONNX output {spec.output_name!r} has shape "
                             f"{tuple(expected.shape)} for a batch of {probe.shape[0]}, "
                             "expected [B,D]")
    output_dim = expected.shape[1]
    if backend != "onnxruntime":
        try:
            converted = convert_with_onnx2torch(model).eval()
            with torch.no_grad():
                error = _relative_error(converted(probe), expected)
            if not error <= VERIFY_RTOL:
                raise ValueError(f"converted output differs from onnxruntime by {error:.2e} "
                                 f"relative (> {VERIFY_RTOL:g})")
        except Exception as err:  # onnx2torch raises NotImplementedError, KeyError, ...
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            if backend == "torch":
                raise ModelLoadError(f"{path}: onnx2torch conversion failed "
                                     f"(onnx_backend=torch): {reason}") from None
            logger.info("teacher %s: onnx2torch conversion not usable (%s); using onnxruntime",
                        path, reason)
        else:
            logger.info("teacher %s: ONNX converted with onnx2torch, verified against "
                        "onnxruntime on a probe batch (relative error %.1e)", path, error)
            module = converted.to(device)
            return OnnxInputAdapter(module, spec), "onnx2torch", output_dim, convention
    session = cpu_session if device.type == "cpu" else ort_session(path, device)
    module = OnnxRuntimeModule(session, spec, output_dim, expected.dtype, device)
    logger.info("teacher %s: running ONNX in onnxruntime (%s)", path,
                ", ".join(session.get_providers()))
    return OnnxInputAdapter(module, spec), "onnxruntime", output_dim, convention

