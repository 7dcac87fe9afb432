"""The image side (trunk + ViT module + ITC projection) exported to ONNX and run by ONNX Runtime
or OpenVINO, for index builds and query-time image encoding on CPU.

    envlf index build --checkpoint runs/ucm-lite4/best --source tiles/ --out indexes/x --runtime openvino
    (--runtime onnx | onnx-int8 | openvino | openvino-bf16; --onnx / --onnx-int8 are short for the first two)

`export_image_side` writes ``<checkpoint>/image_side[.int8].onnx`` once (keyed by the model's
fingerprint in ``.json`` beside it, so a changed checkpoint is exported again); `OnnxImageEncoder`
has the `encode_image(pixels, return_tokens=True)` of the torch model, so `GalleryIndex` uses
either. Outputs: the L2-normalised ITC embedding (B, E) and the tokens re-ranking reads
(B, 1 + P, D). int8: dynamic quantisation of the MatMul / Gemm weights (the ViT module and
projections; the convolutions stay float), measured before it is offered
(``envlf bench image-encoder``). OpenVINO compiles the same fp32 export for the CPU: ``openvino``
keeps fp32 arithmetic (``INFERENCE_PRECISION_HINT=f32``), ``openvino-bf16`` lets it compute in
bfloat16 where the CPU has bf16 instructions (AVX512-BF16 / AMX; elsewhere it is fp32 again).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

OPSET = 17
# the image side's runtimes: "torch" is the model itself
RUNTIMES = ("torch", "onnx", "onnx-int8", "openvino", "openvino-bf16")


class _ImageSide(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor):
        tokens = self.model.image_tokens(pixels)
        return self.model.embed_image_tokens(tokens), tokens


def onnx_path(checkpoint: str | Path, int8: bool = False) -> Path:
    return Path(checkpoint) / ("image_side.int8.onnx" if int8 else "image_side.onnx")


def export_image_side(model, path: str | Path, int8: bool = False, batch: int = 2) -> Path:
    """Export (or reuse) the model's image side to `path`; returns it. A `.json` beside the
    file records the model fingerprint it was made from; another fingerprint exports again."""
    path = Path(path)
    stamp = path.with_suffix(".json")
    fp = model.fingerprint()
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()).get("model_fingerprint") == fp:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.config.vision.image_size
    was_training = model.training
    dummy = torch.zeros(batch, 3, size, size, device=model.device)
    plain = path if not int8 else path.with_name(path.name.replace(".int8", ".fp32-tmp"))
    # the wrapper in eval mode: torch.onnx.export restores the mode it finds, and a new Module
    # is in training mode, which left the whole model's dropout on after an export
    with torch.no_grad():
        torch.onnx.export(_ImageSide(model).eval(), (dummy,), str(plain), input_names=["pixels"],
                          output_names=["embedding", "tokens"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}, "tokens": {0: "batch"}})
    model.train(was_training)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(plain), str(path), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
        plain.unlink()
    stamp.write_text(json.dumps({"model_fingerprint": fp, "int8": int8, "opset": OPSET}))
    return path


class OnnxImageEncoder:
    """`encode_image` of a model, run by ONNX Runtime on CPU; `config` and `device` are the
    model's, so index code treats it as the model's image side."""

    def __init__(self, model, path: str | Path, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.config, self.path = model.config, Path(path)
        self.device = torch.device("cpu")

    def eval(self) -> "OnnxImageEncoder":
        return self

    def encode_image(self, pixels: torch.Tensor | None = None, features=None, return_tokens: bool = False):
        if pixels is None:
            raise ValueError("the ONNX image side takes pixels, not cached trunk features")
        emb, tokens = self.session.run(None, {"pixels": np.ascontiguousarray(pixels.float().cpu().numpy())})
        emb, tokens = torch.from_numpy(emb), torch.from_numpy(tokens)
        return (emb, tokens) if return_tokens else emb


class OpenVinoImageEncoder(OnnxImageEncoder):
    """`encode_image` of a model, the ONNX export compiled by OpenVINO for the CPU. bf16: let
    OpenVINO compute in bfloat16 (only where the CPU has bf16 instructions)."""

    def __init__(self, model, path: str | Path, threads: int = 0, bf16: bool = False):
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
        if threads:
            # a share of the machine (one of several Ray actors): OpenVINO pins its threads to cores
            # from the first one, so two 1-thread actors shared core 0 and ran at half speed each
            config["INFERENCE_NUM_THREADS"] = threads
            config["ENABLE_CPU_PINNING"] = False
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self._outputs = (self.compiled.output("embedding"), self.compiled.output("tokens"))
        self.config, self.path = model.config, Path(path)
        self.device = torch.device("cpu")

    def encode_image(self, pixels: torch.Tensor | None = None, features=None, return_tokens: bool = False):
        if pixels is None:
            raise ValueError("the OpenVINO image side takes pixels, not cached trunk features")
        # a request per call: the app encodes from several threads, and one request is not shared
        out = self.compiled.create_infer_request().infer({"pixels": np.ascontiguousarray(pixels.float().cpu().numpy())})
        emb, tokens = (torch.from_numpy(np.array(out[o])) for o in self._outputs)
        return (emb, tokens) if return_tokens else emb


def load_image_encoder(model, checkpoint: str | Path, runtime: str = "onnx", threads: int = 0):
    """The image side of a checkpoint in `runtime` (RUNTIMES; the ONNX file is exported on first
    use), or None for "torch" (the model encodes itself)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"image runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        return None
    int8 = runtime == "onnx-int8"
    path = export_image_side(model, onnx_path(checkpoint, int8), int8)
    if runtime.startswith("openvino"):
        return OpenVinoImageEncoder(model, path, threads, bf16=runtime == "openvino-bf16")
    return OnnxImageEncoder(model, path, threads)
