"""The map legend: one place for class names, mask ids, palette colours and draw order.

The world generator (ground truth), the OSM renderer (maps and masks), the manifest (per-class
fractions) and SGDM's prompt rule all read this table, so a class means the same thing everywhere.

Colours reuse the SGDM palette (the MapTiler-style OSM maps of the official SGDM data, github.com/wwangcece/SGDM)
for the classes the official prompt rule knows, so `land, building of regular shape, road, ...` prompts
come out of our maps exactly as they come out of the authors' maps. The light green 228,236,213 is one
of the three colours the official rule calls "woods"; we use it for parks/grass, as MapTiler does, so a
park yields the word "woods" in the prompt exactly as on the authors' maps. Colours of classes the
official rule does not know (railway, farmland, land) are OSM-Carto-like and documented here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MapClass:
    name: str
    id: int  # value in the class-index mask
    rgb: tuple[int, int, int]  # colour in the RGB map
    description: str


# Order = mask id. Do not reorder: ids are stored in built datasets.
CLASSES: tuple[MapClass, ...] = (
    MapClass("land", 0, (242, 239, 233), "background: no mapped feature"),
    MapClass("building", 1, (226, 224, 210), "building=*"),
    MapClass("road", 2, (254, 254, 254), "highway=residential/service/unclassified/living_street/track/footway/..."),
    MapClass("major_road", 3, (255, 204, 133), "highway=motorway/trunk/primary/secondary/tertiary (+ _link)"),
    MapClass("railway", 4, (170, 166, 160), "railway=rail/light_rail/tram/narrow_gauge"),
    MapClass(
        "water", 5, (133, 203, 249), "natural=water, waterway=riverbank, water=*, waterway=river/stream/canal lines"
    ),
    MapClass("forest", 6, (217, 233, 198), "landuse=forest"),
    MapClass("wood", 7, (208, 230, 190), "natural=wood"),
    MapClass("park", 8, (228, 236, 213), "leisure=park/garden, landuse=grass/meadow/recreation_ground"),
    MapClass("farmland", 9, (238, 240, 213), "landuse=farmland/farmyard/orchard"),
)

BY_NAME: dict[str, MapClass] = {c.name: c for c in CLASSES}

# Rasterisation order (later classes paint over earlier ones). Land is the background fill.
DRAW_ORDER: tuple[str, ...] = (
    "farmland",
    "park",
    "forest",
    "wood",
    "water",
    "railway",
    "road",
    "major_road",
    "building",
)

# Official SGDM prompt rule (dataset/LRHRRef.py): exact RGB matches -> words, fixed order.
PROMPT_RULE: tuple[tuple[str, tuple[tuple[int, int, int], ...]], ...] = (
    ("building of regular shape, ", ((226, 224, 210),)),
    ("road, ", ((254, 254, 254), (255, 204, 133))),
    ("woods, ", ((217, 233, 198), (228, 236, 213), (208, 230, 190))),
    ("water area, ", ((133, 203, 249),)),
)


def legend() -> dict[str, dict]:
    """JSON-ready legend: class name -> {id, rgb, description} (written as legend.json)."""
    return {c.name: {"id": c.id, "rgb": list(c.rgb), "description": c.description} for c in CLASSES}


def palette() -> list[int]:
    """Flat 768-entry PIL palette mapping mask id -> RGB (unused entries black)."""
    pal = [0] * 768
    for c in CLASSES:
        pal[3 * c.id : 3 * c.id + 3] = list(c.rgb)
    return pal
