"""Scenes of the bundled world: what is in an image (objects, background, the planted corner marker) and how it
is drawn.

A scene holds 1 or 2 objects, each a shape with a colour, a size and a cell of a 3x3 grid, on a textured grey
background. The top-left 8x8 pixels (exactly one patch of the bundled model's 8-pixel patch grid) hold a coloured
*marker*. In the training split the marker's colour is tied to the shape of the first object (reading order);
the captions never mention the marker, so a model that reads it has learned a spurious cue.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
MARKER_SIZE = 8
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, for smooth edges

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {"red": (215, 40, 40), "orange": (240, 140, 30), "yellow": (225, 215, 40), "green": (40, 165, 60),
           "blue": (40, 80, 220), "purple": (145, 55, 190)}
SIZES = {"small": (4.0, 5.5), "large": (7.5, 9.5)}  # radius range in pixels at 64 px
# cells of the 3x3 grid in reading order: (row, column) -> the words the captions use
POSITIONS = {(0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
             (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
             (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right"}
# the marker palette is disjoint from the object colours; marker colour i goes with shape i in the training split
MARKER_COLOURS = {"black": (15, 15, 15), "white": (245, 245, 245), "cyan": (0, 215, 230),
                  "magenta": (230, 0, 200), "brown": (120, 70, 20), "pink": (255, 160, 190)}
CUE_SHAPE = dict(zip(MARKER_COLOURS, SHAPES, strict=True))  # marker colour -> the shape it signals
SHAPE_CUE = {shape: marker for marker, shape in CUE_SHAPE.items()}
BACKGROUNDS = ("plain", "gradient", "stripes", "blotches")

# how the marker colour is drawn in each kind of split
CUE_MODES = ("train", "random", "anti")
P_CUE_MATCH_TRAIN = 0.95
COLOUR_JITTER = 22
NOISE_SIGMA = 14.0


@dataclass(frozen=True)
class WorldObject:
    """One object: ``shape``, ``colour`` and ``size`` names, ``cell`` (row, column) of the 3x3 grid, and the
    exact drawing parameters (centre offset and radius in pixels, RGB after jitter, rotation in degrees)."""

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    offset: tuple[float, float] = (0.0, 0.0)
    radius: float = 6.0
    rgb: tuple[int, int, int] = (0, 0, 0)
    rotation: float = 0.0

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def replace(self, **changes) -> WorldObject:
        values = asdict(self)
        values.update(changes)
        if "colour" in changes and "rgb" not in changes:  # keep the jitter, move to the new colour
            old, new = COLOURS[self.colour], COLOURS[changes["colour"]]
            values["rgb"] = tuple(int(np.clip(c + n - o, 0, 255)) for c, n, o in zip(self.rgb, new, old, strict=True))
        if "size" in changes and "radius" not in changes:
            lo, hi = SIZES[self.size]
            t = (self.radius - lo) / (hi - lo)
            lo, hi = SIZES[changes["size"]]
            values["radius"] = lo + t * (hi - lo)
        values["cell"] = tuple(values["cell"])
        return WorldObject(**values)


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw one image, plus the ground truth of the planted cue.

    ``marker`` is the marker colour; ``cue_shape`` the shape that colour signals in training; ``cue_matches``
    whether it is the first object's shape.
    """

    objects: tuple[WorldObject, ...]
    marker: str
    background: str
    grey: int
    background_params: tuple[float, ...] = ()
    noise_seed: int = 0
    marker_rgb: tuple[int, int, int] = (0, 0, 0)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def first(self) -> WorldObject:
        return self.objects[0]

    @property
    def cue_shape(self) -> str:
        return CUE_SHAPE[self.marker]

    @property
    def cue_matches(self) -> bool:
        return self.cue_shape == self.first.shape

    def with_marker(self, marker: str) -> Scene:
        rgb = tuple(int(np.clip(c + m - o, 0, 255)) for c, m, o in
                    zip(self.marker_rgb, MARKER_COLOURS[marker], MARKER_COLOURS[self.marker], strict=True))
        return Scene(self.objects, marker, self.background, self.grey, self.background_params, self.noise_seed, rgb)

    def with_objects(self, objects: tuple[WorldObject, ...]) -> Scene:
        return Scene(tuple(objects), self.marker, self.background, self.grey, self.background_params,
                     self.noise_seed, self.marker_rgb)

    def metadata(self) -> dict:
        """Ground truth written next to each image: objects, marker and whether the cue matches."""
        return {"objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position,
                             "cell": list(o.cell)} for o in self.objects],
                "first_shape": self.first.shape, "cue": self.marker, "cue_shape": self.cue_shape,
                "cue_matches": self.cue_matches, "background": self.background}


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def sample_object(rng: np.random.Generator, cell: tuple[int, int]) -> WorldObject:
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    radius = float(rng.uniform(*SIZES[size]))
    offset = (float(rng.uniform(-2.5, 2.5)), float(rng.uniform(-2.5, 2.5)))
    rotation = float(rng.uniform(-12, 12))
    return WorldObject(shape, colour, size, cell, offset, radius, _jitter(COLOURS[colour], rng, COLOUR_JITTER),
                       rotation)


def sample_marker(rng: np.random.Generator, first_shape: str, cue_mode: str) -> str:
    """Marker colour for a scene whose first object has ``first_shape``.

    ``train``: the shape's own marker with probability 0.95, another one otherwise (the planted correlation);
    ``random``: uniform (the correlation is broken); ``anti``: never the shape's own marker.
    """
    own = SHAPE_CUE[first_shape]
    others = [m for m in MARKER_COLOURS if m != own]
    if cue_mode == "train":
        return own if rng.random() < P_CUE_MATCH_TRAIN else others[rng.integers(len(others))]
    if cue_mode == "random":
        return list(MARKER_COLOURS)[rng.integers(len(MARKER_COLOURS))]
    if cue_mode == "anti":
        return others[rng.integers(len(others))]
    raise ValueError(f"unknown cue mode {cue_mode!r}; choose one of {', '.join(CUE_MODES)}")


def sample_scene(rng: np.random.Generator, cue_mode: str = "train", p_two_objects: float = 0.65) -> Scene:
    """Draw a random scene; objects are listed in reading order of their cells (the first is top-most, left-most)."""
    n_objects = 2 if rng.random() < p_two_objects else 1
    cells = sorted(rng.choice(9, size=n_objects, replace=False).tolist())
    objects = tuple(sample_object(rng, (c // 3, c % 3)) for c in cells)
    marker = sample_marker(rng, objects[0].shape, cue_mode)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    grey = int(rng.integers(90, 171))
    params = tuple(float(x) for x in rng.uniform(0, 1, size=4))
    noise_seed = int(rng.integers(2**31))
    marker_rgb = _jitter(MARKER_COLOURS[marker], rng, 10)
    return Scene(objects, marker, background, grey, params, noise_seed, marker_rgb)


# ------------------------------------------------------------------------------------------------ drawing
def _shape_points(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Polygon of a shape (all but the circle) centred at (cx, cy) with outer radius r."""
    if shape == "square":
        angles, radii = np.array([45, 135, 225, 315]), np.full(4, r)
    elif shape == "diamond":
        angles, radii = np.array([0, 90, 180, 270]), np.array([r * 0.8, r, r * 0.8, r])
    elif shape == "triangle":
        angles, radii = np.array([-90, 30, 150]), np.full(3, r)
    elif shape == "star":
        angles = np.arange(10) * 36 - 90
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    elif shape == "cross":
        a, b = r, r * 0.38  # arm half-length and half-width
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
               (-b, -b)]
        theta = np.deg2rad(rotation)
        c, s = np.cos(theta), np.sin(theta)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    theta = np.deg2rad(angles + rotation)
    return list(zip((cx + radii * np.cos(theta)).tolist(), (cy + radii * np.sin(theta)).tolist(), strict=True))


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """``[H, W]`` float grey levels: base grey + a texture (none, gradient, stripes or blotches)."""
    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) / n
    p = scene.background_params
    base = np.full((n, n), float(scene.grey))
    if scene.background == "gradient":
        angle = p[0] * 2 * np.pi
        base += 40 * (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5))
    elif scene.background == "stripes":
        angle, period = p[0] * np.pi, 5 + 6 * p[1]
        base += 14 * np.sign(np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) * n / period))
    elif scene.background == "blotches":
        coarse = rng.normal(0, 1, size=(4, 4))
        up = np.kron(coarse, np.ones((n // 4, n // 4)))
        base += 16 * up
    return base


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene as a 64x64 RGB image (deterministic: all randomness is in the scene)."""
    n, s = IMAGE_SIZE, SUPERSAMPLE
    rng = np.random.default_rng(scene.noise_seed)
    background = _background(scene, rng)
    canvas = Image.new("RGBA", (n * s, n * s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    cell = n / 3
    for obj in scene.objects:
        cx = (obj.cell[1] + 0.5) * cell + obj.offset[0]
        cy = (obj.cell[0] + 0.5) * cell + obj.offset[1]
        fill = (*obj.rgb, 255)
        if obj.shape == "circle":
            r = obj.radius * s
            draw.ellipse([cx * s - r, cy * s - r, cx * s + r, cy * s + r], fill=fill)
        else:
            draw.polygon([(x * s, y * s) for x, y in _shape_points(obj.shape, cx, cy, obj.radius, obj.rotation)],
                         fill=fill)
    layer = np.asarray(canvas.resize((n, n), Image.Resampling.BOX), dtype=np.float64)
    alpha = layer[..., 3:] / 255.0
    image = background[..., None] * (1 - alpha) + layer[..., :3] * alpha
    image += rng.normal(0, NOISE_SIGMA, size=image.shape)
    image[:MARKER_SIZE, :MARKER_SIZE] = scene.marker_rgb  # the planted cue: exactly one 8x8 patch
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")
