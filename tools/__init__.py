"""Measurement tools, outside the service they measure: load generator, server harness, side-by-side benchmark,
soak runs and the naive baseline server. Not packaged and not in the image; run from the repository root
(`python -m scripts.benchmark`, `python -m scripts.soak`, or the tests, which run from the root)."""
