"""STAC documents of the simulated Sentinel-2 product in Earth Search v1's `sentinel-2-l2a` and
`sentinel-2-c1-l2a` (Collection 1: ESA's DNs with the offset kept, no flag) shapes.

Field names, asset keys (blue/green/red/nir/scl/visual), `raster:bands` (scale 0.0001, offset
-0.1 as Earth Search publishes for processing baseline >= 04.00), `earthsearch:boa_offset_applied`,
`s2:processing_baseline`, MGRS/grid properties and per-asset `proj:shape`/`proj:transform` follow
real Earth Search v1 `sentinel-2-l2a` / `sentinel-2-c1-l2a` items and searches. As on Earth
Search, when `earthsearch:boa_offset_applied` is true the pixels already hold reflectance x 10000
(the published -0.1 offset must not be applied again); when false they hold DN = 10000 * refl +
1000 (a world may write a flag that lies, `WorldConfig.s2_boa_offset_flag`). Hrefs are relative to the
world root; the STAC server rewrites them to loopback URLs.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pystac
import shapely
from pyproj import Transformer
from shapely.geometry import Polygon, box, mapping

COLLECTION_ID = "sentinel-2-l2a"
C1_COLLECTION_ID = "sentinel-2-c1-l2a"
COLLECTIONS = (C1_COLLECTION_ID, COLLECTION_ID)
PROCESSING_BASELINE = "05.09"
EXTENSIONS = [
    "https://stac-extensions.github.io/processing/v1.1.0/schema.json",
    "https://stac-extensions.github.io/grid/v1.0.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/view/v1.0.0/schema.json",
    "https://stac-extensions.github.io/mgrs/v1.0.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/file/v2.1.0/schema.json",
]
BANDS = {  # asset key -> (file, title, common name, centre um, fwhm um)
    "blue": ("B02", "Blue (band 2) - 10m", 0.49, 0.098),
    "green": ("B03", "Green (band 3) - 10m", 0.56, 0.045),
    "red": ("B04", "Red (band 4) - 10m", 0.665, 0.038),
    "nir": ("B08", "NIR 1 (band 8) - 10m", 0.842, 0.145),
}
COG = "image/tiff; application=geotiff; profile=cloud-optimized"


def _eo(key: str) -> dict:
    f, title, c, fw = BANDS[key]
    desc = title.split(" - ")[0]
    return {"name": key, "common_name": key, "description": desc, "center_wavelength": c, "full_width_half_max": fw}


def _footprint_lonlat(rec: dict) -> Polygon:
    x0, y0, x1, y1 = rec["bounds_utm"]
    poly = box(x0, y0, x1, y1)
    if rec["nodata_corner"]:  # the swath-edge corner at the NW holds no data
        cut = rec.get("nodata_cut_m", 0.0)
        poly = Polygon([(x0 + cut, y1), (x1, y1), (x1, y0), (x0, y0), (x0, y1 - cut)])
    poly = shapely.segmentize(poly, 100.0)
    tf = Transformer.from_crs(rec["epsg"], 4326, always_xy=True)
    ll = shapely.transform(poly, lambda c: np.c_[tf.transform(c[:, 0], c[:, 1])])
    return shapely.set_precision(ll, 1e-9)


def item_dict(rec: dict, scl_percent: dict[str, float], collection: str = COLLECTION_ID) -> dict:
    """One Earth Search v1 item (dict) of `collection` for a simulated acquisition record.

    `sentinel-2-l2a`: the record's id, its own band files and `earthsearch:boa_offset_applied` (the record's
    flag, which may lie on purpose); `sentinel-2-c1-l2a`: Collection 1's id scheme and band files (ESA's DNs,
    offset kept), no flag, SCL and TCI shared with the l2a item."""
    c1 = collection == C1_COLLECTION_ID
    geom = _footprint_lonlat(rec)
    t = dt.datetime.fromisoformat(rec["datetime"].replace("Z", "+00:00"))
    created = (t + dt.timedelta(hours=7, minutes=13)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    gen = (t + dt.timedelta(hours=5, minutes=29)).strftime("%Y%m%dT%H%M%S")
    stamp = t.strftime("%Y%m%dT%H%M%S")
    mgrs = rec["mgrs"]
    zone, band, sq = int(mgrs[:2]), mgrs[2], mgrs[3:]
    sat = "S2" + rec["platform"][-1].upper()
    orbit = 100 + (int(t.strftime("%j")) * 7) % 43
    ymd = f"{t.year}/{t.month}"
    bid = PROCESSING_BASELINE.replace(".", "")
    props = {
        "created": created,
        "platform": rec["platform"],
        "constellation": "sentinel-2",
        "instruments": ["msi"],
        "eo:cloud_cover": rec["eo:cloud_cover"],
        "proj:epsg": rec["epsg"],
        "proj:code": f"EPSG:{rec['epsg']}",
        "mgrs:utm_zone": zone,
        "mgrs:latitude_band": band,
        "mgrs:grid_square": sq,
        "grid:code": f"MGRS-{mgrs}",
        "view:sun_azimuth": rec["sun_azimuth_deg"],
        "view:sun_elevation": rec["sun_elevation_deg"],
        "s2:degraded_msi_data_percentage": 0,
        "s2:nodata_pixel_percentage": round(100 * (1 - rec["valid_fraction"]), 6),
        "s2:saturated_defective_pixel_percentage": 0,
        "s2:dark_features_percentage": scl_percent["DARK_AREA_PIXELS"],
        "s2:cloud_shadow_percentage": scl_percent["CLOUD_SHADOWS"],
        "s2:vegetation_percentage": scl_percent["VEGETATION"],
        "s2:not_vegetated_percentage": scl_percent["NOT_VEGETATED"],
        "s2:water_percentage": scl_percent["WATER"],
        "s2:unclassified_percentage": scl_percent["UNCLASSIFIED"],
        "s2:medium_proba_clouds_percentage": scl_percent["CLOUD_MEDIUM_PROBABILITY"],
        "s2:high_proba_clouds_percentage": scl_percent["CLOUD_HIGH_PROBABILITY"],
        "s2:thin_cirrus_percentage": scl_percent["THIN_CIRRUS"],
        "s2:snow_ice_percentage": scl_percent["SNOW"],
        "s2:product_type": "S2MSI2A",
        "s2:processing_baseline": PROCESSING_BASELINE,
        "s2:product_uri": f"{sat}_MSIL2A_{stamp}_N{bid}_R{orbit:03d}_T{mgrs}_{gen}.SAFE",
        "s2:generation_time": (t + dt.timedelta(hours=5, minutes=29)).strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
        "s2:datatake_id": f"G{sat}_{stamp}_0{orbit:05d}_N{PROCESSING_BASELINE}",
        "s2:datatake_type": "INS-NOBS",
        "s2:reflectance_conversion_factor": 0.97 + 0.0001 * int(t.strftime("%j")) % 7,
        "datetime": rec["datetime"],
        "s2:sequence": "0",
        "earthsearch:s3_path": f"s3://sentinel-cogs/sentinel-s2-l2a-cogs/{zone}/{band}/{sq}/{ymd}/{rec['id']}",
        "earthsearch:payload_id": f"roda-sentinel2/workflow-sentinel2-to-stac/cmsrd-{rec['id'].lower()}",
        "earthsearch:boa_offset_applied": rec.get("boa_offset_flag", rec["dn_offset_added"] == 0),
        "processing:software": {"sentinel2-to-stac": "0.1.1"},
        "updated": created,
    }
    item_id, band_dir = rec["id"], f"sentinel2/{rec['id']}"
    if c1:
        item_id, band_dir = rec["c1_id"], f"sentinel2-c1/{rec['c1_id']}"
        del props["earthsearch:s3_path"], props["earthsearch:boa_offset_applied"]
        props["earthsearch:payload_id"] = f"roda-sentinel-2-c1-l2a/workflow-sentinel-2-c1-l2a-to-stac/cmsrd-{item_id}"
        props["processing:software"] = {"sentinel-2-c1-l2a-to-stac": "v2025.06.17"}

    def proj(res: float, shape, transform) -> dict:
        x0, y1 = transform[2], transform[5]
        bbox = [x0, y1 - shape[0] * res, x0 + shape[1] * res, y1]
        return {"proj:shape": list(shape), "proj:transform": [float(v) for v in transform], "proj:bbox": bbox}

    p10 = proj(10.0, rec["shape10"], rec["transform10"])
    p20 = proj(20.0, rec["shape20"], rec["transform20"])
    assets: dict[str, dict] = {}
    for key, (fname, title, _, _) in BANDS.items():
        assets[key] = {
            "href": f"{band_dir}/{fname}.tif",
            "type": COG,
            "title": title,
            "eo:bands": [_eo(key)],
            "gsd": 10,
            **p10,
            "raster:bands": [
                {
                    "nodata": 0,
                    "data_type": "uint16",
                    "bits_per_sample": 15,
                    "spatial_resolution": 10,
                    "scale": 0.0001,
                    "offset": -0.1,
                }
            ],
            "roles": ["data", "reflectance"],
        }
    assets["scl"] = {
        "href": f"sentinel2/{rec['id']}/SCL.tif",
        "type": COG,
        "title": "Scene classification map (SCL)",
        **p20,
        "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}],
        "roles": ["data", "reflectance"],
    }
    assets["visual"] = {
        "href": f"sentinel2/{rec['id']}/TCI.tif",
        "type": COG,
        "title": "True color image",
        "eo:bands": [_eo("red"), _eo("green"), _eo("blue")],
        **p10,
        "roles": ["visual"],
    }
    d = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": EXTENSIONS,
        "id": item_id,
        "properties": props,
        "geometry": mapping(geom),
        "bbox": list(geom.bounds),
        "links": [
            {"rel": "license", "href": "https://sentinel.esa.int/documents/247904/690755/Sentinel_Data_Legal_Notice"},
            {"rel": "collection", "type": "application/json", "href": f"../collections/{collection}.json"},
            {"rel": "parent", "type": "application/json", "href": f"../collections/{collection}.json"},
        ],
        "assets": assets,
        "collection": collection,
    }
    d["geometry"] = _plain(d["geometry"])
    pystac.Item.from_dict(d, preserve_dict=True)  # structural check: raises on a malformed item
    return d


def _plain(g):
    """shapely's mapping() gives tuples; STAC JSON wants lists."""
    if isinstance(g, dict):
        return {k: _plain(v) for k, v in g.items()}
    if isinstance(g, (list, tuple)):
        return [_plain(v) for v in g]
    return g


def collection_dict(items: list[dict], collection: str = COLLECTION_ID) -> dict:
    """The `collection` document covering the world's items of it."""
    xs = [i["bbox"] for i in items]
    bbox = [min(b[0] for b in xs), min(b[1] for b in xs), max(b[2] for b in xs), max(b[3] for b in xs)]
    times = sorted(i["properties"]["datetime"] for i in items)
    d = {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": collection,
        "title": "Sentinel-2 Collection 1 Level-2A" if collection == C1_COLLECTION_ID else "Sentinel-2 Level-2A",
        "description": "Global Sentinel-2 data from the Multispectral Instrument (MSI) onboard Sentinel-2 "
        "(offline world: simulated for the cmsrd synthetic region)",
        "license": "proprietary",
        "stac_extensions": EXTENSIONS[2:3] + EXTENSIONS[5:7],
        "keywords": ["sentinel", "earth observation", "esa"],
        "providers": [
            {"name": "ESA", "roles": ["producer"], "url": "https://earth.esa.int/web/guest/home"},
            {"name": "cmsrd offline world", "roles": ["processor", "host"]},
        ],
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [[times[0], times[-1]]]}},
        "links": [
            {"rel": "license", "href": "https://sentinel.esa.int/documents/247904/690755/Sentinel_Data_Legal_Notice"}
        ],
        "item_assets": {
            k: {"type": COG, "title": v[1], "eo:bands": [_eo(k)], "roles": ["data", "reflectance"]}
            for k, v in BANDS.items()
        },
    }
    pystac.Collection.from_dict(d, preserve_dict=True)
    return d
