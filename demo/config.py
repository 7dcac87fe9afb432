"""Settings of the app, from command-line flags and environment variables (flags win).

| flag             | environment variable             | default                                        |
|------------------|----------------------------------|------------------------------------------------|
| --checkpoint     | ENVLF_CHECKPOINT                 | embedded default (envlf.bootstrap)             |
| --index          | ENVLF_INDEX                      | built from --gallery, or the embedded default   |
| --gallery        | ENVLF_GALLERY                    | none                                           |
| --captions       | ENVLF_CAPTIONS (os.pathsep list) | none                                           |
| --feedback       | ENVLF_FEEDBACK                   | /data/envlf/feedback.csv if /data is writable,  |
|                  |                                  | else <home>/feedback.csv                       |
| --device         | ENVLF_DEVICE                     | auto (cuda when available)                     |
| --home           | ENVLF_HOME                       | ~/.cache/envlf                                 |
| --host           | GRADIO_SERVER_NAME               | 127.0.0.1 (0.0.0.0 on Hugging Face Spaces)     |
| --port           | GRADIO_SERVER_PORT               | 7860                                           |
| --max-file-size  | ENVLF_MAX_FILE_SIZE              | 20MB (uploads larger than this are refused)     |
| --login          | ENVLF_LOGIN (auto/on/off)        | auto: on when the Space has hf_oauth enabled   |
| --model-reload   | ENVLF_MODEL_RELOAD (on/off)      | on locally, off on Spaces: the Model tab loads |
|                  |                                  | another checkpoint by path or hub id           |

Flags are read with ``parse_known_args``, so ``gradio app.py`` (reload mode) and pytest,
whose own arguments are on sys.argv, do not break the import of ``app``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from envlf.paths import Paths

DEFAULT_PORT = 7860
DEFAULT_MAX_FILE_SIZE = "20MB"
# An image upload bigger than this (width x height) is refused before it is decoded.
MAX_UPLOAD_PIXELS = 40_000_000
SPACES_DATA = Path("/data")  # Hugging Face Spaces' persistent storage, when the Space has it

# --onnx: the runtime (envlf.model.onnx.RUNTIMES) of each choice
ONNX_CHOICES = {"off": "torch", "fp32": "onnx", "int8": "onnx-int8", "openvino": "openvino",
                "openvino-bf16": "openvino-bf16"}
# web basemaps for the results map (--basemap): a name, or any XYZ tile URL template
BASEMAPS = {"osm": ("https://tile.openstreetmap.org/{z}/{x}/{y}.png", "© OpenStreetMap contributors")}

# user/repo or user/repo@revision: a Hugging Face hub id (only when no such local path exists)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass
class AppConfig:
    checkpoint: str | None = None  # local directory or hub id
    index: Path | None = None
    gallery: str | None = None  # dataset spec for envlf.data.datasets.load_dataset
    captions: list[str] = field(default_factory=list)
    feedback: Path = Path("feedback.csv")
    device: str = "auto"
    home: Path = Path("~/.cache/envlf").expanduser()
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_file_size: str = DEFAULT_MAX_FILE_SIZE
    max_upload_pixels: int = MAX_UPLOAD_PIXELS
    login: str = "auto"  # auto | on | off
    share: bool = False
    # The Model tab's "serve another checkpoint": a server path or hub id typed by a visitor.
    # Fine on one's own machine; on a public Space it stays off unless its owner turns it on.
    model_reload: str = "auto"  # auto | on | off
    # Query images (uploads) through the ONNX export of the image side: a key of ONNX_CHOICES
    onnx: str = "off"
    # The results map's background: "none" (offline: each scene's own overview), a BASEMAPS name
    # or an XYZ tile URL template ({z}/{x}/{y}) the visitor's browser fetches (needs the internet)
    basemap: str = "none"

    @property
    def basemap_tiles(self) -> tuple[str, str] | None:
        """(tile URL template, attribution) of the web basemap, or None (offline map)."""
        if self.basemap == "none":
            return None
        return BASEMAPS.get(self.basemap, (self.basemap, ""))

    @property
    def allow_model_reload(self) -> bool:
        return self.model_reload == "on" or (self.model_reload == "auto" and not self.on_spaces)

    @property
    def on_spaces(self) -> bool:
        return bool(os.environ.get("SPACE_ID"))

    @property
    def use_login(self) -> bool:
        """Show the Hugging Face login button (needs `hf_oauth: true` in the Space's README)."""
        if self.login == "on":
            return True
        if self.login == "off":
            return False
        return self.on_spaces and bool(os.environ.get("OAUTH_CLIENT_ID"))


def is_hub_id(spec: str) -> bool:
    """True for "user/repo" (optionally "@revision") that is not an existing local path."""
    return bool(HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def default_feedback_path(home: Path, data_dir: Path = SPACES_DATA) -> Path:
    """Spaces' persistent /data when it is there and writable, else the app's home."""
    if _writable_dir(data_dir):
        return data_dir / "envlf" / "feedback.csv"
    return home / "feedback.csv"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python app.py", description="EnVLF retrieval and annotation app (Gradio).",
                                allow_abbrev=False)  # no prefix matching of other tools' flags
    p.add_argument("--checkpoint", help="checkpoint directory or Hugging Face hub id (user/repo[@rev]) "
                                        "[ENVLF_CHECKPOINT]")
    p.add_argument("--index", help="gallery index directory (envlf index build) [ENVLF_INDEX]")
    p.add_argument("--gallery", help="dataset to index when no --index is given: Karpathy JSON / dir, precomp, "
                                     "CSV or an image folder [ENVLF_GALLERY]")
    p.add_argument("--captions", nargs="*", help="caption corpora for image->text search [ENVLF_CAPTIONS, "
                                                 f"'{os.pathsep}'-separated]")
    p.add_argument("--feedback", help="feedback CSV file [ENVLF_FEEDBACK]")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... [ENVLF_DEVICE]")
    p.add_argument("--home", help="cache and work directory [ENVLF_HOME, default ~/.cache/envlf]")
    p.add_argument("--host", help="address to listen on [GRADIO_SERVER_NAME]")
    p.add_argument("--port", type=int, help="port [GRADIO_SERVER_PORT]")
    p.add_argument("--max-file-size", help=f"largest upload, e.g. 20MB [ENVLF_MAX_FILE_SIZE, default "
                                           f"{DEFAULT_MAX_FILE_SIZE}]")
    p.add_argument("--login", choices=["auto", "on", "off"], help="Hugging Face login button [ENVLF_LOGIN]")
    p.add_argument("--share", action="store_true", help="Gradio share link (needs the internet)")
    p.add_argument("--onnx", choices=list(ONNX_CHOICES),
                   help="encode uploaded query images with the ONNX export of the image side (made once beside "
                        "the checkpoint): ONNX Runtime fp32 / int8, or OpenVINO fp32 (openvino) / bf16 "
                        "[ENVLF_ONNX, default off]")
    p.add_argument("--basemap", help="web map under the results map: none (offline), "
                                     f"{', '.join(BASEMAPS)} or an XYZ tile URL with {{z}}/{{x}}/{{y}}; the "
                                     "browser fetches its tiles [ENVLF_BASEMAP, default none]")
    p.add_argument("--model-reload", choices=["auto", "on", "off"],
                   help="let the Model tab serve another checkpoint [ENVLF_MODEL_RELOAD; auto: off on Spaces]")
    return p


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                data_dir: Path = SPACES_DATA) -> AppConfig:
    """Flags (argv, default sys.argv[1:]; unknown ones ignored) over environment variables."""

    env = os.environ if env is None else env
    args, _unknown = build_parser().parse_known_args(sys.argv[1:] if argv is None else list(argv))

    def pick(flag, var: str, default=None):
        if flag is not None:
            return flag
        value = env.get(var)
        return value if value not in (None, "") else default

    home = Paths.resolve(args.home, env).home
    captions = args.captions
    if captions is None:
        captions = [c for c in env.get("ENVLF_CAPTIONS", "").split(os.pathsep) if c.strip()]
    feedback = pick(args.feedback, "ENVLF_FEEDBACK")
    index = pick(args.index, "ENVLF_INDEX")
    default_host = "0.0.0.0" if env.get("SPACE_ID") else "127.0.0.1"
    port = pick(args.port, "GRADIO_SERVER_PORT", DEFAULT_PORT)
    try:
        port = int(port)
    except ValueError:
        raise SystemExit(f"error: GRADIO_SERVER_PORT={port!r} is not a port number") from None
    max_file_size = str(pick(args.max_file_size, "ENVLF_MAX_FILE_SIZE", DEFAULT_MAX_FILE_SIZE)).replace(" ", "")
    if not re.fullmatch(r"\d+(b|kb|mb|gb|tb)", max_file_size, flags=re.IGNORECASE):
        raise SystemExit(f"error: max file size {max_file_size!r}: expected a number and a unit, e.g. 20MB")
    onnx = pick(args.onnx, "ENVLF_ONNX", "off")
    if onnx not in ONNX_CHOICES:
        raise SystemExit(f"error: ENVLF_ONNX={onnx!r}: expected one of {', '.join(ONNX_CHOICES)}")
    basemap = str(pick(args.basemap, "ENVLF_BASEMAP", "none"))
    if basemap not in ("none", *BASEMAPS) and not (
            re.match(r"https?://", basemap) and all(f"{{{k}}}" in basemap for k in "zxy")):
        raise SystemExit(f"error: basemap {basemap!r}: expected none, {', '.join(BASEMAPS)} or a tile URL "
                         "such as https://tile.example.org/{z}/{x}/{y}.png")
    return AppConfig(
        checkpoint=pick(args.checkpoint, "ENVLF_CHECKPOINT"),
        index=Path(index).expanduser() if index else None,
        gallery=pick(args.gallery, "ENVLF_GALLERY"),
        captions=list(captions),
        feedback=Path(feedback).expanduser() if feedback else default_feedback_path(home, data_dir),
        device=pick(args.device, "ENVLF_DEVICE", "auto"),
        home=home,
        host=pick(args.host, "GRADIO_SERVER_NAME", default_host),
        port=port,
        max_file_size=max_file_size,
        login=pick(args.login, "ENVLF_LOGIN", "auto"),
        share=bool(args.share),
        model_reload=pick(args.model_reload, "ENVLF_MODEL_RELOAD", "auto"),
        onnx=onnx,
        basemap=basemap,
    )
