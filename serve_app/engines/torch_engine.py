from __future__ import annotations

import monai.networks.nets
import torch

from serve_app.model_spec import ModelRepositoryError, ModelSpec, WeightsFormat

__all__ = ["TorchEngine", "build_network", "check_network", "monai_network"]


def monai_network(spec: ModelSpec) -> torch.nn.Module:
    """The model's MONAI network, freshly initialised."""
    return getattr(monai.networks.nets, spec.network.name)(**spec.network.args)


def build_network(spec: ModelSpec) -> torch.nn.Module:
    """The model's network with its trained weights."""
    if spec.weights.format is WeightsFormat.torchscript:
        return torch.jit.load(str(spec.weights_path), map_location="cpu")
    network = monai_network(spec)
    network.load_state_dict(torch.load(spec.weights_path, map_location="cpu", weights_only=True))
    return network


def check_network(spec: ModelSpec) -> None:
    """Build the model's network, load its weights and run one zero input ``(1, *spec.input_item_shape)`` through
    it on the CPU: ``ModelRepositoryError`` naming the weights file when they do not load into the network, or when
    the output does not have one channel per label. ONNX weights are left to their engine."""
    if spec.weights.format is WeightsFormat.onnx:
        return
    try:
        network = build_network(spec).eval()
    except Exception as e:  # torch's: a state dict of another network, a corrupt file, a TorchScript that is not
        problem = " ".join(str(e).split())[:400]
        raise ModelRepositoryError(f"{spec.weights_path}: does not load into the network: {problem}") from None
    try:
        with torch.inference_mode():
            channels = network(torch.zeros((1, *spec.input_item_shape))).shape[1]
    except Exception as e:
        problem = " ".join(str(e).split())[:400]
        raise ModelRepositoryError(
            f"{spec.weights_path}: the network does not take a {spec.input_item_shape} input: {problem}"
        ) from None
    if channels != len(spec.labels):
        labels_from = "network_data_format.outputs channel_def" if spec.source == "monai-bundle" else "labels"
        raise ModelRepositoryError(
            f"{spec.weights_path}: the network gives {channels} output channels; {labels_from} names {len(spec.labels)}"
        )


class TorchEngine:
    """PyTorch on CPU or CUDA; on CUDA optionally fp16, channels-last (2D or 3D), compiled, CUDA graphs."""

    def __init__(self, spec: ModelSpec, device: torch.device):
        options = spec.engine
        cuda = device.type == "cuda"
        self.device = device
        self.dtype = torch.float16 if cuda and options.precision == "fp16" else torch.float32
        channels_last = torch.channels_last if len(spec.input_item_shape) == 3 else torch.channels_last_3d
        self.memory_format = channels_last if cuda and options.channels_last else torch.contiguous_format
        network = build_network(spec).eval().to(device=device, dtype=self.dtype, memory_format=self.memory_format)
        if cuda:
            torch.backends.cudnn.benchmark = True  # shapes are few and fixed (padded batches)
        self.network = torch.compile(network) if options.compile else network
        self._graphs: dict[tuple, tuple] | None = {} if cuda and options.cuda_graphs else None

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(dtype=self.dtype).contiguous(memory_format=self.memory_format)
        if self._graphs is None:
            return self.network(batch).float()
        return self._replay(batch).float()

    def _replay(self, batch: torch.Tensor) -> torch.Tensor:
        """Run through a CUDA graph captured once per input shape: one launch instead of hundreds."""
        key = tuple(batch.shape)
        if key not in self._graphs:
            static_input = batch.clone()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up outside the graph: cuDNN picks its algorithms here
                    self.network(static_input)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.network(static_input)
            self._graphs[key] = (graph, static_input, static_output)
        graph, static_input, static_output = self._graphs[key]
        static_input.copy_(batch)
        graph.replay()
        return static_output.clone()
