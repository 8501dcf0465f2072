"""Draws docs/images/icon.png, the Comfy Registry icon (run from the repository root): two overlapping discs,
the overlap in a contrasting colour, 256 x 256."""
from PIL import Image, ImageChops, ImageDraw

SIZE, SCALE = 256, 4   # drawn 4x larger, then downsampled for smooth edges
big = SIZE * SCALE


def disc(box):
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).ellipse([v * SCALE for v in box], fill=255)
    return mask


left, right = disc((28, 60, 164, 196)), disc((92, 60, 228, 196))
icon = Image.new("RGBA", (big, big), (24, 26, 33, 255))
icon.paste((66, 133, 244, 255), mask=left)
icon.paste((245, 166, 35, 255), mask=right)
icon.paste((250, 250, 250, 255), mask=ImageChops.multiply(left, right))
icon.resize((SIZE, SIZE), Image.LANCZOS).save("docs/images/icon.png", optimize=True)
