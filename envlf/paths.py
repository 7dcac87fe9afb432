"""Where EnVLF keeps its files: one `Paths` object, made once at the edge (the CLI, the app's
config, the first-start builder) and passed down. The user's ENVLF_HOME is read here and
nowhere else; no module hands another a folder through the environment.

    home/
      cache/features/     trunk feature maps (envlf.data.features), shared by training,
                          fine-tuning, indexing and the app's first start
      models/             the embedded default's checkpoints (envlf.bootstrap)
      indexes/            gallery indexes the app built
      feedback.csv        the app's relevance labels (unless --feedback names another file)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

HOME_ENV = "ENVLF_HOME"
DEFAULT_HOME = "~/.cache/envlf"


@dataclass(frozen=True)
class Paths:
    home: Path

    def __post_init__(self):
        object.__setattr__(self, "home", Path(self.home).expanduser())

    @classmethod
    def resolve(cls, home: str | Path | None = None, env: Mapping[str, str] | None = None) -> "Paths":
        """`home` if given, else $ENVLF_HOME (of `env`, default os.environ), else ~/.cache/envlf."""
        env = os.environ if env is None else env
        return cls(Path(home or env.get(HOME_ENV) or DEFAULT_HOME))

    @property
    def cache(self) -> Path:
        return self.home / "cache"

    @property
    def features(self) -> Path:
        return self.cache / "features"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def indexes(self) -> Path:
        return self.home / "indexes"

    @property
    def feedback(self) -> Path:
        return self.home / "feedback.csv"
