"""Engines on CPU, no Ray: ONNX export and onnxruntime executed for real; TensorRT against a stand-in module.

No TensorRT can be installed here, so every test whose name says ``mocked_tensorrt`` runs the
TensorRT code against ``FakeTensorRT``, which records what the code asked the builder for.
"""

from __future__ import annotations

import shutil
import sys
import types

import onnx
import pytest
import torch

from helpers import MODEL, medserve
from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.engines import load_engine
from serve_app.engines.base import PaddedBatches
from serve_app.engines.onnx_export import FP32_TOLERANCE, cached_onnx_path, compare_with_torch, input_shape, onnx_for
from serve_app.engines.torch_engine import build_network
from serve_app.model_spec import ModelSpec, read_model_spec


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return read_model_spec(EMBEDDED_MODEL_REPOSITORY / MODEL / "model.yaml")


def with_engine(spec: ModelSpec, **options) -> ModelSpec:
    return spec.model_copy(update={"engine": spec.engine.model_copy(update=options)})


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("engine-cache")
        patch.setenv("MEDSERVE_ENGINE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def onnxruntime_engine(spec, engine_cache):
    assert not cached_onnx_path(spec).exists()
    return load_engine(with_engine(spec, backend="onnxruntime"), "cpu")


def test_onnxruntime_engine_exports_into_the_cache_on_first_use(spec, engine_cache, onnxruntime_engine):
    exported = cached_onnx_path(spec)
    assert exported.is_file() and exported.is_relative_to(engine_cache)
    assert not (spec.folder / spec.engine.onnx_file).exists()  # the package folder is left alone


def test_an_onnx_shipped_beside_the_weights_is_used_as_it_is(spec, onnxruntime_engine, tmp_path):
    shutil.copy(cached_onnx_path(spec), tmp_path / "shipped.onnx")
    shipped = with_engine(spec, onnx_file="shipped.onnx").model_copy(update={"folder": tmp_path})
    assert onnx_for(shipped) == tmp_path / "shipped.onnx"


def test_onnx_export_matches_torch_for_batches_1_and_3(spec, onnxruntime_engine):
    path = cached_onnx_path(spec)
    check = compare_with_torch(build_network(spec).eval(), path, input_shape(spec, 1), FP32_TOLERANCE)
    print(check)
    assert check.ok and check.batch_sizes == (1, 3)
    batch_axis = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.HasField("dim_value")


def test_onnx_check_fails_against_other_weights(spec, onnxruntime_engine):
    other = build_network(spec).eval()
    with torch.no_grad():
        next(other.parameters()).add_(0.05)
    check = compare_with_torch(other, cached_onnx_path(spec), input_shape(spec, 1), FP32_TOLERANCE)
    assert not check.ok and "FAILED" in str(check)


def test_onnxruntime_engine_matches_torch_engine_on_a_padded_batch(spec, onnxruntime_engine):
    seen = []

    def recording(batch):
        seen.append(batch.shape[0])
        return onnxruntime_engine.engine(batch)

    recording.device = onnxruntime_engine.device
    padded = PaddedBatches(recording, spec.engine.batch_sizes)
    batch = torch.rand((3, *input_shape(spec, 1)[1:]), generator=torch.Generator().manual_seed(1))
    logits = padded(batch)
    expected = load_engine(spec, "cpu")(batch)
    assert seen == [4]
    assert logits.shape == expected.shape == (3, 2, 96, 96, 48)
    assert (logits - expected).abs().max() < FP32_TOLERANCE


def test_export_onnx_command(tmp_path):
    out = tmp_path / "tmp" / "model.onnx"
    result = medserve("export-onnx", MODEL, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "max abs difference" in result.stdout and " ok" in result.stdout
    onnx.checker.check_model(str(out), full_check=True)


def test_export_onnx_command_fails_above_the_tolerance_and_writes_nothing(tmp_path, capsys):
    from serve_app.cli import main

    out = tmp_path / "model.onnx"
    assert main(["export-onnx", MODEL, "--out", str(out), "--tolerance", "1e-9"]) == 2
    assert "does not match torch, nothing written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one


def test_export_onnx_command_unknown_model(tmp_path, capsys):
    from serve_app.cli import main

    assert main(["export-onnx", "no-such-model", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


# --- TensorRT -------------------------------------------------------------------------------------


def test_tensorrt_engine_cache_key_changes_with_each_input():
    from serve_app.engines.tensorrt_engine import engine_cache_key

    base = dict(
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        tensorrt_version="10.9.0.34",
        precision="fp16",
        batch_sizes=(1, 2, 4, 8),
        onnx_bytes=b"onnx",
    )
    key = engine_cache_key(**base)
    assert engine_cache_key(**base) == key
    variants = dict(
        gpu_name="NVIDIA H200",
        compute_capability=(8, 9),
        tensorrt_version="10.10.0.31",
        precision="int8",
        batch_sizes=(1, 2, 4),
        onnx_bytes=b"onnx2",
    )
    for field, value in variants.items():
        assert engine_cache_key(**{**base, field: value}) != key, field


class FakeTensorRT(types.ModuleType):
    """A stand-in for the ``tensorrt`` package: the few TensorRT 10 names the engine uses, recording calls."""

    def __init__(self, version: str = "10.9.0.34", parses: bool = True):
        super().__init__("tensorrt")
        self.__version__ = version
        self.builders = []
        fake = self

        class Logger:
            WARNING = "WARNING"

            def __init__(self, level):
                self.level = level

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, min, opt, max):
                self.shapes[name] = (min, opt, max)

        class Config:
            def __init__(self):
                self.flags, self.profiles, self.int8_calibrator, self.calibration_profile = set(), [], None, None

            def set_flag(self, flag):
                self.flags.add(flag)

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def set_calibration_profile(self, profile):
                self.calibration_profile = profile

        class Builder:
            def __init__(self, logger):
                self.network_flags = None
                fake.builders.append(self)

            def create_network(self, flags):
                self.network_flags = flags
                return types.SimpleNamespace(
                    get_input=lambda i: types.SimpleNamespace(name="image", shape=(-1, 1, 96, 96, 48))
                )

            def create_builder_config(self):
                self.config = Config()
                return self.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"serialized engine"

        class OnnxParser:
            num_errors = 0 if parses else 1

            def __init__(self, network, logger):
                pass

            def parse(self, model):
                return parses

            def get_error(self, index):
                return "Unsupported operator"

        class IInt8EntropyCalibrator2:
            def __init__(self):
                pass

        self.Logger, self.Builder, self.OnnxParser, self.IInt8EntropyCalibrator2 = (
            Logger,
            Builder,
            OnnxParser,
            IInt8EntropyCalibrator2,
        )
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")


@pytest.fixture
def fake_tensorrt(monkeypatch) -> FakeTensorRT:
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


@pytest.mark.parametrize("precision, flags", [("fp32", set()), ("fp16", {"FP16"}), ("int8", {"FP16", "INT8"})])
def test_tensorrt_builder_config_with_mocked_tensorrt(fake_tensorrt, tmp_path, precision, flags):
    from serve_app.engines.tensorrt_engine import build_plan

    calibration = [torch.rand(4, 1, 96, 96, 48) for _ in range(2)] if precision == "int8" else None
    plan = build_plan(b"onnx", precision, (1, 2, 4, 8), calibration, tmp_path / "calibration")

    assert plan == b"serialized engine"
    (builder,) = fake_tensorrt.builders
    config = builder.config
    assert builder.network_flags == 0
    assert config.flags == flags
    (profile,) = config.profiles
    assert profile.shapes == {"image": ((1, 1, 96, 96, 48), (8, 1, 96, 96, 48), (8, 1, 96, 96, 48))}
    if precision != "int8":
        assert config.int8_calibrator is None and config.calibration_profile is None
        return
    calibrator = config.int8_calibrator
    assert isinstance(calibrator, fake_tensorrt.IInt8EntropyCalibrator2)
    assert config.calibration_profile.shapes == {"image": ((4, 1, 96, 96, 48),) * 3}
    assert calibrator.get_batch_size() == 4
    assert calibrator.get_batch(["image"]) == [calibration[0].data_ptr()]
    assert calibrator.get_batch(["image"]) == [calibration[1].data_ptr()]
    assert calibrator.get_batch(["image"]) is None
    assert calibrator.read_calibration_cache() is None
    calibrator.write_calibration_cache(memoryview(b"scales"))
    assert calibrator.read_calibration_cache() == b"scales"


def test_tensorrt_parse_errors_are_reported_with_mocked_tensorrt(monkeypatch):
    from serve_app.engines.tensorrt_engine import build_plan

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(parses=False))
    with pytest.raises(RuntimeError, match="cannot parse the ONNX: Unsupported operator"):
        build_plan(b"onnx", "fp16", (1, 2))


def test_tensorrt_calibration_batches_are_preprocessed_ct_volumes(spec):
    from serve_app.samples.calibration import CALIBRATION_BATCH_SIZE, CALIBRATION_VOLUMES, calibration_batches

    batches = calibration_batches(spec, "cpu")
    assert len(batches) == CALIBRATION_VOLUMES // CALIBRATION_BATCH_SIZE
    assert {tuple(b.shape) for b in batches} == {(CALIBRATION_BATCH_SIZE, 1, 96, 96, 48)}
    volumes = torch.cat(batches)
    assert 0.0 <= volumes.min() and volumes.max() <= 1.0  # the intensity window's range
    assert volumes.std() > 0.1 and not torch.equal(volumes[0], volumes[1])


def test_tensorrt_engine_needs_cuda_with_mocked_tensorrt(spec, fake_tensorrt):
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        load_engine(with_engine(spec, backend="tensorrt"), "cpu")


def test_tensorrt_11_is_refused_with_mocked_tensorrt(spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(version="11.0.0"))
    with pytest.raises(ImportError, match="written for TensorRT 10"):
        load_engine(with_engine(spec, backend="tensorrt"), "cuda")


def test_missing_tensorrt_gives_a_clear_error(spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # what `import tensorrt` sees where it is not installed
    with pytest.raises(ImportError, match=r"needs the tensorrt package: pip install 'medserve\[tensorrt\]'"):
        load_engine(with_engine(spec, backend="tensorrt"), "cuda")
