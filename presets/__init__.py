"""Shipped YAML presets (data only); `lowmem presets` lists them."""
