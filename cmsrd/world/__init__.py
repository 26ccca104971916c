"""The offline world: a deterministic, co-located synthetic region (OSM PBF, HR imagery, Sentinel-2-like
L2A product, STAC items, ground truth) plus loopback servers that speak the real services' protocols.

This is test and demo infrastructure only; real runs talk to the real services.

World directory contract (written by `cmsrd.world.generate`, read by `cmsrd.world.servers` and tests):

    <world>/world.json                    config used + facts: name, seed, center_lon/lat, bounds_lonlat
                                          [w,s,e,n], bounds_3857, hr_gsd_m (native HR pixel, EPSG:3857 m),
                                          zooms [16,17,18], utm_epsg, hr_capture_date "YYYY-MM-DD",
                                          s2_items [sentinel-2-l2a ids], s2_items_c1 [the same
                                          acquisitions' sentinel-2-c1-l2a ids], attribution, generator version
    <world>/osm/world.osm.pbf             OSM data (osmium SimpleWriter)
    <world>/hr/hr.tif                     HR RGB uint8, EPSG:3857, tiled GeoTIFF
    <world>/tiles/{z}/{x}/{y}.jpg         XYZ pyramid (256 px JPEG) for the world's zooms;
                                          tiles outside the world are simply absent
    <world>/sentinel2/<item_id>/{B02,B03,B04,B08,SCL,TCI}.tif
                                          COGs in the UTM zone's CRS (bands uint16 nodata 0 at 10 m,
                                          SCL uint8 at 20 m, TCI uint8 RGB at 10 m); band DNs per
                                          WorldConfig.s2_boa_offset_applied
    <world>/sentinel2-c1/<c1_id>/{B02,B03,B04,B08}.tif
                                          the same bands as Collection 1 holds them (DN = 10000 refl + 1000)
    <world>/stac/items/<item_id>.json     Earth Search v1 `sentinel-2-l2a` and `sentinel-2-c1-l2a` items
                                          (c1: no boa flag, SCL/TCI shared with the l2a item); asset hrefs are
                                          relative to the world root (e.g. "sentinel2/<id>/B04.tif");
                                          the STAC server rewrites them to absolute loopback URLs
    <world>/stac/collections/<id>.json    collection documents (sentinel-2-l2a, sentinel-2-c1-l2a)
    <world>/truth/classes.tif             class-index raster (ids of `cmsrd.classes`) on the hr.tif grid
    <world>/truth/truth.json              what was generated: feature counts per class, the injected
                                          LR shift (metres and S2 pixels, +x east +y north), per-item
                                          dates, cloud patch bbox, haze/gain/blur parameters, the DN offset
                                          truly added and the flag written (s2_items keyed by both ids)
"""
