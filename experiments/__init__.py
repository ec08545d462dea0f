"""Reproducible experiments that measure what fapm does (see docs/evidence.md)."""
