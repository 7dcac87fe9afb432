"""The demo world: synthetic aerial tiles with true captions and instance masks.

A fresh offline machine has no remote-sensing dataset; this package makes one. Scenes are
procedural top-down 256x256 tiles (airport, harbor, residential, farmland, ... 16 types)
built from a seed with numpy and Pillow only. Captions are written from each scene's own
layout, so every count, colour, size, position and relation in them is true, and every
noun phrase lists the ids of the objects it names in the instance mask. That turns the
attention-map check into a number (the pointing game) instead of a screenshot.

    from envlf.world import generate_world, render_scene
    generate_world("/tmp/world", n=1500, seed=0)     # Karpathy-layout dataset on disk
    image, mask, layout = render_scene(7, "harbor")  # one tile in memory

CLI: ``envlf world generate --out DIR --n 1500 --seed 0`` and
``envlf world sheet --data DIR --out sheet.png``.
"""

from .captions import Caption, Phrase, caption_scene, tokenize
from .render import render_scene
from .scenes import SCENE_TYPES, Layout, SceneObject, build_layout
from .store import contact_sheet, generate_world

__all__ = [
    "SCENE_TYPES", "Caption", "Layout", "Phrase", "SceneObject", "build_layout",
    "caption_scene", "contact_sheet", "generate_world", "render_scene", "tokenize",
]
