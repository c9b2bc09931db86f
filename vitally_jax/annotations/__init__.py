"""Bundled gene-relationship tables (CORUM, hu.MAP, Reactome, SIGNOR, StringDB; CORUM complexes).

Licences per file in `LICENSE` beside this file.
"""
