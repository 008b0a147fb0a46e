"""Baselines the product is compared with in ``benchmarks/fps.py``; not part of the product."""
