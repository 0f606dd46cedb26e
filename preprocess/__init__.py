"""python -m preprocess: images -> verified HDF5 shards (docs/data-format.md)."""
