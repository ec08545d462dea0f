"""Rendering results: tables for people, JSON for scripts, progress on a terminal (torch-free)."""
