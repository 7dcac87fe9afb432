"""Checkpoints in the Hugging Face layout: ``config.json`` + ``model.safetensors`` + tokenizer files.

Loading is strict: every tensor the architecture needs must be in the file with the right
shape, and nothing else may be. A damaged, truncated or foreign file fails with a one-line
`CheckpointError`. Nothing is ever unpickled: only safetensors files are read, and a
directory holding only ``*.bin`` / ``*.pt`` files is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from envlf.model.config import EnVLFConfig
from envlf.model.text import load_tokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a one-line reason."""


def save_pretrained(model, directory: str | Path) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # write to temporary names first, then rename: a crash never leaves a half-written
    # model.safetensors beside a config that promises a whole one
    tmp_w, tmp_c = d / (WEIGHTS_NAME + ".tmp"), d / (CONFIG_NAME + ".tmp")
    save_file(state, str(tmp_w), metadata={"format": "pt", "envlf_config": model.config.to_json()})
    tmp_c.write_text(model.config.to_json(), encoding="utf-8")
    tmp_w.replace(d / WEIGHTS_NAME)
    tmp_c.replace(d / CONFIG_NAME)
    model.tokenizer.save_pretrained(str(d))
    return d


def sniff(head: bytes) -> str:
    """What the first 9 bytes of a weights file say it is: "safetensors" (an 8-byte
    little-endian header length, then the JSON header's '{'), "pickle" (torch.save's zip
    archive, or a raw pickle's PROTO opcode 0x80 + protocol 2..5), or "unknown"."""
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "pickle"
    return "unknown"


def _read_state(path: Path) -> dict[str, torch.Tensor]:

    if not path.exists():
        pickles = [p.name for p in path.parent.iterdir() if p.suffix in PICKLE_SUFFIXES] if path.parent.is_dir() else []
        if pickles:
            raise CheckpointError(f"{path.parent}: found only {pickles[0]} (a pickle); EnVLF loads safetensors "
                                  "checkpoints only and never unpickles a file")
        raise CheckpointError(f"{path.parent}: no {WEIGHTS_NAME}")
    with path.open("rb") as f:
        head = f.read(9)
    if sniff(head) == "pickle":
        raise CheckpointError(f"{path} is a pickle / torch.save file, not safetensors; refusing to unpickle it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or damaged?): {msg}") from None


def load_state_strict(model, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise CheckpointError(f"{source} does not match the model its config describes: " + "; ".join(parts))
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(state[k].shape)}, "
                                  f"the model expects {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)


def read_checkpoint(directory: str | Path):
    """(config, state dict, tokenizer) of a checkpoint directory, each checked; raises
    CheckpointError. `envlf.model.core.load_pretrained` builds the model from them."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} is not a directory")
    try:
        config = EnVLFConfig.from_json(d / CONFIG_NAME)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    state = _read_state(d / WEIGHTS_NAME)
    try:
        tokenizer = load_tokenizer(str(d))
    except Exception as e:  # transformers raises many types for a broken tokenizer dir
        raise CheckpointError(f"{d}: cannot load the tokenizer saved with the model: {e}") from None
    return config, state, tokenizer


# Config fields that do not change what a trained model computes (training knobs, where its
# weights came from, provenance). Everything else counts, except fields at their dataclass
# default: a field added to the config later (with a default that keeps the old behaviour)
# does not change the fingerprint of existing checkpoints, so their indexes stay valid.
_NOT_INFERENCE = {("name",), ("lineage",), ("format_version",), ("loss",), ("vision", "freeze_trunk"),
                  ("vision", "dropout"), ("vision", "trunk_weights"), ("text", "weights"), ("text", "tokenizer"),
                  ("text", "trainable_layers"), ("text", "hf_config"), ("fusion", "dropout"),
                  ("fusion", "init_from_text_layers"), ("fusion", "mlm_head")}


def _inference_config(config: EnVLFConfig) -> dict:
    """The config fields that shape inference and differ from the dataclass defaults."""
    ref = EnVLFConfig().to_dict()
    out = {}
    for section, value in config.to_dict().items():
        if (section,) in _NOT_INFERENCE:
            continue
        if isinstance(value, dict):
            diff = {k: v for k, v in value.items()
                    if (section, k) not in _NOT_INFERENCE and ref.get(section, {}).get(k, object()) != v}
            if diff:
                out[section] = diff
        elif ref.get(section, object()) != value:
            out[section] = value
    return out


def fingerprint(model) -> str:
    """Short content hash of a model's weights and of the config fields that shape what it
    computes: equal models, equal fingerprints. Indexes and feedback rows record it, so a
    result can be traced to the model that made it and an index refuses another model."""
    h = hashlib.sha256()
    h.update(json.dumps(_inference_config(model.config), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
