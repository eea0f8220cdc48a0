"""Readers for real input files: Xenium bundles (:mod:`.xenium`, :mod:`.xenium_layout`, and the
H&E / alignment a newer bundle ships, :mod:`.discover`), H&E slides (:mod:`.he`), alignment inputs
(:mod:`.landmarks`), regions (:mod:`.regions`: GeoJSON, Xenium Explorer selections), sample sheets
and their sources per format (:mod:`.sheets`), SpatialData and HEST-1k samples (:mod:`.sdata`,
:mod:`.hest`, converted by :mod:`.ingest`).

Submodules are imported on use (``from morphomol.io.xenium import XeniumBundle``) so that
importing one reader does not pull in the dependencies of the others.
"""
