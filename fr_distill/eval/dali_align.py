"""Loose-crop decoding and five-point alignment with NVIDIA DALI (METHOD V2), GPU or CPU.

The same similarity transform as :func:`fr_distill.data.align.alignment_matrix`, applied by
DALI's ``warp_affine`` (bilinear, black outside the image) after ``decoders.image`` — on the
GPU (``mixed`` decode, ``gpu`` warp) for evaluation runs on GPUs, or on the CPU. DALI puts
pixel centres at half-integer coordinates, OpenCV and :mod:`fr_distill.data.align` at integers,
so the matrix is conjugated by a half-pixel shift; crops then agree with the numpy path to
within one grey level of rounding.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fr_distill.data.align import alignment_matrix

from .errors import EvalDataError

_HALF_PIXEL = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
_BACK = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])


def dali_matrix(landmarks: np.ndarray, size: int) -> np.ndarray:
    """The forward alignment matrix in DALI's half-pixel-centre convention (2×3 float32)."""
    forward = np.vstack([alignment_matrix(landmarks, size), [0.0, 0.0, 1.0]])
    return (_HALF_PIXEL @ forward @ _BACK)[:2].astype(np.float32)


class DaliAlignedImages:
    """Like :class:`fr_distill.eval.extract.AlignedImages`, decoding and warping with DALI.

    ``device``: ``"gpu"`` (``device_id`` = the CUDA device) or ``"cpu"``.
    """

    def __init__(self, paths: Sequence[str], landmarks: np.ndarray, size: int = 112,
                 device: str = "gpu", device_id: int = 0, num_threads: int = 4):
        self.paths, self.landmarks, self.size = paths, landmarks, size
        self.device, self.device_id, self.num_threads = device, device_id, num_threads
        self._pipe, self._batch = None, 0

    def __len__(self) -> int:
        return len(self.paths)

    def _pipeline(self, batch: int):
        if self._pipe is not None and batch <= self._batch:
            return self._pipe
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"

        @pipeline_def(batch_size=batch, num_threads=self.num_threads,
                      device_id=self.device_id if gpu else None, prefetch_queue_depth=1,
                      exec_async=False, exec_pipelined=False)
        def align():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            matrix = fn.external_source(name="matrix", dtype=types.FLOAT)
            image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                      output_type=types.RGB)
            return fn.warp_affine(image, matrix=matrix.gpu() if gpu else matrix,
                                  size=(self.size, self.size), fill_value=0, inverse_map=False,
                                  interp_type=types.INTERP_LINEAR)

        self._pipe, self._batch = align(), batch
        self._pipe.build()
        return self._pipe

    def load(self, start: int, stop: int) -> np.ndarray:
        encoded = []
        for index in range(start, stop):
            try:
                encoded.append(np.frombuffer(Path(self.paths[index]).read_bytes(), dtype=np.uint8))
            except OSError as err:
                raise EvalDataError(f"{self.paths[index]}: cannot read image ({err.strerror})") from None
        pipe = self._pipeline(stop - start)
        pipe.feed_input("encoded", encoded)
        pipe.feed_input("matrix", [dali_matrix(self.landmarks[i], self.size) for i in range(start, stop)])
        (crops,) = pipe.run()
        if self.device == "gpu":
            crops = crops.as_cpu()
        return np.stack([np.asarray(crops.at(i)) for i in range(stop - start)]).transpose(0, 3, 1, 2)
