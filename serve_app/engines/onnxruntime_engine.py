from __future__ import annotations

import logging

import onnxruntime
import torch

from serve_app.engines.onnx_export import onnx_for
from serve_app.model_spec import ModelSpec

log = logging.getLogger(__name__)


class OnnxRuntimeEngine:
    """ONNX Runtime: the CUDA execution provider on a GPU where the installed build has it, else the CPU one.

    Always fp32: ``precision: fp16`` would need a converted model, and options a backend cannot
    honour are ignored. Batches go through host memory (no I/O binding).
    """

    def __init__(self, spec: ModelSpec, device: torch.device):
        self.device = device
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                # Serving on the CPU while holding a GPU is slow but correct; say so rather than fail.
                log.warning("onnxruntime has no CUDAExecutionProvider here; model %s runs on the CPU", spec.name)
        self.session = onnxruntime.InferenceSession(str(onnx_for(spec)), providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = batch.detach().to("cpu", torch.float32).numpy()
        logits = self.session.run(None, {self.input_name: inputs})[0]
        return torch.from_numpy(logits).to(self.device)
