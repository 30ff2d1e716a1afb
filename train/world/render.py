"""Pixels of a scene: flat colours, no anti-aliasing, so every pixel is exactly a palette colour.

Hard edges and pure colours keep the picture trivially separable for a random frozen vision tower,
and let tests check pixels exactly. A triangle points up and fills its box's bottom edge.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from factedge.edge.errors import ConfigError

from .scene import PALETTE, SIZE_EXTENT, Obj, Scene


def _box(obj: Obj, size: int) -> tuple[int, int, int, int]:
    half = SIZE_EXTENT[obj.size] * size / 2
    cx, cy = obj.x * size, obj.y * size
    return round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1


def draw_object(draw: ImageDraw.ImageDraw, obj: Obj, size: int) -> None:
    x0, y0, x1, y1 = _box(obj, size)
    fill = PALETTE[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ConfigError(f"cannot draw shape {obj.shape!r}")


def render(scene: Scene, size: int = 224) -> Image.Image:
    """The RGB picture of `scene`, `size` x `size` pixels."""
    if scene.background not in PALETTE or any(o.color not in PALETTE for o in scene.objects):
        raise ConfigError("scene uses a colour outside the palette")
    image = Image.new("RGB", (size, size), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj, size)
    return image
