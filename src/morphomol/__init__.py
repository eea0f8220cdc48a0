"""morphomol: H&E + Xenium slides to morpho-molecular models and benchmark tables."""

__version__ = "0.1.0"
