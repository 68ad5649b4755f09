"""A generated catalogue: rendered garments of varied type, colour and pattern with matching descriptions.

It lets the service start anywhere, with no download: `write_catalogue` renders PNG silhouettes (t-shirt,
dress, trousers, ... in solid, striped, dotted or checked fabric) and writes them with a JSON Lines file
that `load_catalogue("jsonl:<folder>/catalogue.jsonl")` reads. The same config gives the same bytes.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from model.files import replace_folder

logger = logging.getLogger(__name__)

CATALOGUE_FILE, CONFIG_FILE = "catalogue.jsonl", "synthetic.json"
BACKGROUND = (236, 236, 236)  # one exact colour, so tests can tell garment pixels from the backdrop

# Named colours far enough apart that +-COLOUR_JITTER per channel never makes one look like another.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 40),
    "orange": (240, 130, 20),
    "yellow": (245, 210, 40),
    "green": (40, 140, 60),
    "blue": (40, 90, 200),
    "purple": (120, 50, 150),
    "pink": (240, 140, 180),
    "brown": (120, 75, 40),
    "beige": (215, 195, 160),
    "grey": (140, 140, 140),
    "black": (25, 25, 25),
    "white": (252, 252, 252),
}
COLOUR_JITTER = 8
_LIGHT = frozenset({"yellow", "pink", "beige", "white", "grey", "orange"})  # patterned in black, others white

PATTERNS = ("solid", "striped", "dotted", "checked")

Point = tuple[float, float]
Silhouette = Callable[[ImageDraw.ImageDraw, Callable[[Point], tuple[int, int]]], None]


def _polygon(outline: str) -> Silhouette:
    """A filled polygon from "x y, x y, ..." in fractions of the canvas."""
    points = [tuple(float(v) for v in pair.split()) for pair in outline.split(",")]

    def draw(canvas: ImageDraw.ImageDraw, at: Callable[[Point], tuple[int, int]]) -> None:
        canvas.polygon([at(p) for p in points], fill=255)

    return draw


def _bag(canvas: ImageDraw.ImageDraw, at: Callable[[Point], tuple[int, int]]) -> None:
    canvas.rounded_rectangle([at((0.18, 0.42)), at((0.82, 0.86))], radius=10, fill=255)
    left, top = at((0.32, 0.2))
    right, bottom = at((0.68, 0.62))
    canvas.arc([left, top, right, bottom], start=180, end=360, fill=255, width=9)


def _shoe(canvas: ImageDraw.ImageDraw, at: Callable[[Point], tuple[int, int]]) -> None:
    _polygon("0.08 0.58, 0.3 0.52, 0.42 0.4, 0.6 0.42, 0.9 0.56, 0.93 0.66, 0.08 0.66")(canvas, at)
    canvas.rectangle([at((0.07, 0.64)), at((0.94, 0.7))], fill=255)  # the sole


@dataclass(frozen=True)
class GarmentType:
    name: str  # the word in titles and descriptions
    category: str  # H&M-style product group
    silhouette: Silhouette
    descriptions: tuple[str, ...]  # style sentences; `{pattern}` is the pattern phrase


GARMENTS: tuple[GarmentType, ...] = (
    GarmentType(
        "t-shirt",
        "Garment Upper body",
        _polygon(
            "0.35 0.15, 0.45 0.15, 0.5 0.2, 0.55 0.15, 0.65 0.15,"  # shoulders and neckline
            "0.88 0.3, 0.8 0.4, 0.7 0.33, 0.7 0.85, 0.3 0.85, 0.3 0.33, 0.2 0.4, 0.12 0.3"  # short sleeves
        ),
        (
            "T-shirt in soft cotton jersey with short sleeves and a round neckline{pattern}.",
            "Relaxed-fit t-shirt in organic cotton with dropped shoulders{pattern}.",
        ),
    ),
    GarmentType(
        "jumper",
        "Garment Upper body",
        _polygon(
            "0.35 0.15, 0.45 0.15, 0.5 0.19, 0.55 0.15, 0.65 0.15,"  # shoulders and neckline
            "0.85 0.3, 0.92 0.8, 0.82 0.82, 0.72 0.4, 0.72 0.85,"  # right sleeve, body
            "0.28 0.85, 0.28 0.4, 0.18 0.82, 0.08 0.8, 0.15 0.3"  # left sleeve
        ),
        (
            "Jumper in a soft rib knit with long sleeves and ribbing at the cuffs and hem{pattern}.",
            "Long-sleeved jumper in a wool blend with a crew neck{pattern}.",
        ),
    ),
    GarmentType(
        "dress",
        "Garment Full body",
        _polygon(
            "0.4 0.08, 0.45 0.08, 0.5 0.13, 0.55 0.08, 0.6 0.08,"  # straps and neckline
            "0.63 0.25, 0.6 0.42, 0.8 0.9, 0.2 0.9, 0.4 0.42, 0.37 0.25"  # bodice, waist, flared skirt
        ),
        (
            "Knee-length dress with narrow shoulder straps, a fitted waist and a flared skirt{pattern}.",
            "Sleeveless A-line dress in woven viscose with a concealed zip at the back{pattern}.",
        ),
    ),
    GarmentType(
        "skirt",
        "Garment Lower body",
        _polygon("0.35 0.25, 0.65 0.25, 0.82 0.78, 0.18 0.78"),
        (
            "A-line skirt with a high waist and a concealed zip at the side{pattern}.",
            "Short flared skirt in woven fabric with a wide waistband{pattern}.",
        ),
    ),
    GarmentType(
        "trousers",
        "Garment Lower body",
        _polygon("0.3 0.08, 0.7 0.08, 0.74 0.92, 0.58 0.92, 0.5 0.35, 0.42 0.92, 0.26 0.92"),
        (
            "Straight-leg trousers with a regular waist, side pockets and a zip fly{pattern}.",
            "Wide-leg trousers in a soft weave with an elasticated waist{pattern}.",
        ),
    ),
    GarmentType(
        "shorts",
        "Garment Lower body",
        _polygon("0.25 0.3, 0.75 0.3, 0.8 0.68, 0.56 0.7, 0.5 0.5, 0.44 0.7, 0.2 0.68"),
        (
            "Shorts in cotton twill with an elasticated waist and side pockets{pattern}.",
            "Knee-length shorts with a drawstring waist and turn-ups at the hems{pattern}.",
        ),
    ),
    GarmentType(
        "trainers",
        "Shoes",
        _shoe,
        (
            "Low-top trainers with lacing at the front and a chunky rubber sole{pattern}.",
            "Canvas trainers with a padded edge and a flat sole{pattern}.",
        ),
    ),
    GarmentType(
        "bag",
        "Accessories",
        _bag,
        (
            "Handbag with a top handle, a zip at the top and an inner pocket{pattern}.",
            "Small shoulder bag with a fold-over flap and a magnetic fastener{pattern}.",
        ),
    ),
)


@dataclass(frozen=True)
class SyntheticConfig:
    items: int = 2000
    seed: int = 0
    width: int = 192
    height: int = 256


@dataclass(frozen=True)
class SyntheticItem:
    """One generated product: what it is, which fixes both its picture and its words."""

    index: int
    garment: GarmentType
    colour: str
    pattern: str
    style: int  # which description (and product group) of the garment type

    @property
    def pattern_colour(self) -> str:
        return "black" if self.colour in _LIGHT else "white"

    @property
    def title(self) -> str:
        adjective = "" if self.pattern == "solid" else f" {self.pattern}"
        return f"{self.colour.capitalize()}{adjective} {self.garment.name}"

    @property
    def text(self) -> str:
        phrase = {
            "solid": f", in plain {self.colour}",
            "striped": f", with {self.pattern_colour} stripes",
            "dotted": f", with {self.pattern_colour} polka dots",
            "checked": f", in a {self.pattern_colour} check",
        }[self.pattern]
        return f"{self.title}. {self.garment.descriptions[self.style].format(pattern=phrase)}"

    @property
    def group(self) -> str:
        # Colour variants of one design share a product group, as in H&M, so splits never separate them.
        return f"{self.garment.name}-{self.pattern}-{self.style}"


def describe(config: SyntheticConfig) -> list[SyntheticItem]:
    """The catalogue's items: garment types in turn (equal counts), colour, pattern and style drawn."""
    rng = random.Random(config.seed)
    colours = sorted(COLOURS)
    return [
        SyntheticItem(
            index=i,
            garment=GARMENTS[i % len(GARMENTS)],
            colour=rng.choice(colours),
            pattern=rng.choice(PATTERNS),
            style=rng.randrange(2),
        )
        for i in range(config.items)
    ]


def _fabric(item: SyntheticItem, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """The whole canvas in the item's fabric: its colour (slightly jittered) and pattern."""
    base = tuple(
        min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[item.colour]
    )
    fabric = Image.new("RGB", size, base)
    ink = COLOURS[item.pattern_colour]
    draw = ImageDraw.Draw(fabric)
    width, height = size
    period = rng.randint(14, 22)
    # Pattern coverage stays well under half, so the named colour is the one most pixels show.
    if item.pattern == "striped":
        band = period // 3
        for y in range(rng.randrange(period), height, period):
            draw.rectangle([0, y, width, y + band - 1], fill=ink)
    elif item.pattern == "dotted":
        radius = max(2, period // 5)
        for row, y in enumerate(range(period // 2, height, period)):
            for x in range((row % 2) * period // 2, width, period):
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=ink)
    elif item.pattern == "checked":
        line = max(2, period // 6)
        for x in range(0, width, period):
            draw.rectangle([x, 0, x + line - 1, height], fill=ink)
        for y in range(0, height, period):
            draw.rectangle([0, y, width, y + line - 1], fill=ink)
    return fabric


def render(item: SyntheticItem, config: SyntheticConfig) -> Image.Image:
    """The item's product photo: its silhouette cut from its fabric on a plain backdrop."""
    rng = random.Random(f"{config.seed}:{item.index}")  # per item, so one image does not shift the next
    size = (config.width, config.height)
    scale = rng.uniform(0.85, 1.0)
    dx, dy = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)

    def at(point: Point) -> tuple[int, int]:
        x = 0.5 + (point[0] - 0.5) * scale + dx
        y = 0.5 + (point[1] - 0.5) * scale + dy
        return round(x * config.width), round(y * config.height)

    mask = Image.new("L", size, 0)
    item.garment.silhouette(ImageDraw.Draw(mask), at)
    photo = Image.new("RGB", size, BACKGROUND)
    photo.paste(_fabric(item, size, rng), mask=mask)
    return photo


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def write_catalogue(out: str | Path, config: SyntheticConfig | None = None) -> Path:
    """Render the catalogue into folder `out` (catalogue.jsonl, images/, synthetic.json) and return the
    JSON Lines path. An existing folder made with the same config is kept; the folder appears whole or
    not at all (written beside it, then renamed)."""
    config = config or SyntheticConfig()
    assert config.items >= 1, "a catalogue needs at least one item"
    out = Path(out)
    if (out / CONFIG_FILE).is_file() and json.loads((out / CONFIG_FILE).read_text()) == asdict(config):
        return out / CATALOGUE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        lines = []
        for item in describe(config):
            image = f"images/{item.index:06d}.png"
            (tmp / image).write_bytes(_png(render(item, config)))
            record = {
                "id": f"syn{item.index:06d}",
                "text": item.text,
                "image": image,
                "title": item.title,
                "category": item.garment.category,
                "subcategory": item.garment.name,
                "group": item.group,
                "colour": item.colour,
                "pattern": item.pattern,
            }
            lines.append(json.dumps(record, sort_keys=True))
        (tmp / CATALOGUE_FILE).write_text("\n".join(lines) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(config), sort_keys=True) + "\n")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote a generated catalogue of %d items to %s", config.items, out)
    return out / CATALOGUE_FILE
