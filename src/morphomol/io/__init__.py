"""Readers for real input files: Xenium bundles (:mod:`.xenium`), H&E slides (:mod:`.he`)
and alignment inputs (:mod:`.landmarks`).

Submodules are imported on use (``from morphomol.io.xenium import XeniumBundle``) so that
importing one reader does not pull in the dependencies of the others.
"""
