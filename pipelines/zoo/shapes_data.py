"""The `shapes` data set: 32x32 RGB renders of coloured geometric shapes with captions.

Every image is drawn from a `ShapeScene` (one or two shapes), deterministically from a seed.
One-shape captions read "a small red circle on the left"; two-shape captions read
"a blue square above a green triangle" or "a red star left of a yellow circle".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 135, 20),
}
COLOUR_NAMES = tuple(COLOURS)
POSITIONS = ("left", "right", "top", "bottom", "centre")
SIZES = ("small", "large")
BACKGROUND = (245, 245, 245)

# centre of the shape (x, y) in pixels for each position word
POSITION_CENTRES = {
    "left": (9.0, 16.0),
    "right": (23.0, 16.0),
    "top": (16.0, 9.0),
    "bottom": (16.0, 23.0),
    "centre": (16.0, 16.0),
}
SIZE_RADII = {"small": 4.5, "large": 7.5}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# two-shape layouts: relation word -> (position of the first shape, position of the second)
RELATIONS = {
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
    "left of": ("left", "right"),
    "right of": ("right", "left"),
}


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene: its kind, colour name, position word and size word."""

    shape: str
    colour: str
    position: str
    size: str


@dataclass(frozen=True)
class ShapeScene:
    """A scene of one or two shapes, with the caption that describes it."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    @property
    def caption(self) -> str:
        """The English caption of the scene."""
        if len(self.objects) == 1:
            obj = self.objects[0]
            return f"a {obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]}"
        first, second = self.objects
        return f"a {first.colour} {first.shape} {self.relation} a {second.colour} {second.shape}"


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy) with circumradius-like size r."""
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * math.sin(a) + r * 0.15)
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "star":
        points = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r * 1.05 if k % 2 == 0 else r * 0.45
            points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return points
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render_scene(
    scene: ShapeScene, jitter: tuple[tuple[float, float], ...] | None = None
) -> Image.Image:
    """Draw a scene as a 32x32 RGB PIL image; `jitter` shifts each shape by (dx, dy) pixels."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, obj in enumerate(scene.objects):
        cx, cy = POSITION_CENTRES[obj.position]
        if jitter is not None:
            cx, cy = cx + jitter[i][0], cy + jitter[i][1]
        r = SIZE_RADII[obj.size]
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=colour)
        else:
            draw.polygon(
                [(x * s, y * s) for x, y in _shape_polygon(obj.shape, cx, cy, r)], fill=colour
            )
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def random_scene(rng: random.Random, two_shape_fraction: float = 0.2) -> ShapeScene:
    """Draw a random scene: one shape, or with probability `two_shape_fraction` two."""
    if rng.random() < two_shape_fraction:
        relation = rng.choice(tuple(RELATIONS))
        first_pos, second_pos = RELATIONS[relation]
        first_shape, second_shape = rng.sample(SHAPES, 2)
        first_colour, second_colour = rng.sample(COLOUR_NAMES, 2)
        return ShapeScene(
            (
                ShapeObject(first_shape, first_colour, first_pos, "small"),
                ShapeObject(second_shape, second_colour, second_pos, "small"),
            ),
            relation,
        )
    obj = ShapeObject(
        rng.choice(SHAPES), rng.choice(COLOUR_NAMES), rng.choice(POSITIONS), rng.choice(SIZES)
    )
    return ShapeScene((obj,))


def sample_shapes(
    n: int,
    seed: int,
    two_shape_fraction: float = 0.2,
) -> tuple[torch.Tensor, list[ShapeScene]]:
    """Render `n` random scenes from `seed`: images (n, 3, 32, 32) uint8 and their scenes."""
    rng = random.Random(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    scenes = []
    for i in range(n):
        scene = random_scene(rng, two_shape_fraction)
        jitter = tuple((rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)) for _ in scene.objects)
        images[i] = np.asarray(render_scene(scene, jitter))
        scenes.append(scene)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), scenes  # (n, 3, 32, 32)


def parse_caption(caption: str) -> ShapeScene | None:
    """The scene a caption describes (without jitter), or None if it is not in the grammar."""
    words = caption.strip().lower().rstrip(".").split()
    if len(words) == 7 and words[0] == "a":
        size, colour, shape = words[1:4]
        phrase = " ".join(words[4:])
        position = {v: k for k, v in POSITION_PHRASES.items()}.get(phrase)
        if size in SIZES and colour in COLOURS and shape in SHAPES and position:
            return ShapeScene((ShapeObject(shape, colour, position, size),))
    for relation, (first_pos, second_pos) in RELATIONS.items():
        rel = relation.split()
        n = len(rel)
        if (
            len(words) == 7 + n - 1
            and words[0] == "a"
            and words[3 : 3 + n] == rel
            and words[3 + n] == "a"
        ):
            c1, s1 = words[1:3]
            c2, s2 = words[4 + n : 6 + n]
            if {c1, c2} <= set(COLOURS) and {s1, s2} <= set(SHAPES):
                return ShapeScene(
                    (
                        ShapeObject(s1, c1, first_pos, "small"),
                        ShapeObject(s2, c2, second_pos, "small"),
                    ),
                    relation,
                )
    return None


def caption_words() -> list[str]:
    """Every word the caption grammar can produce, sorted."""
    words = {"a"} | set(SHAPES) | set(COLOURS) | set(SIZES)
    for phrase in POSITION_PHRASES.values():
        words |= set(phrase.split())
    for relation in RELATIONS:
        words |= set(relation.split())
    return sorted(words)
