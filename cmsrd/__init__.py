"""cmsrd: build CMSRD-style LR-Map-HR super-resolution datasets (dataset half of the toolkit)."""

__version__ = "0.1.0"
