"""Bytes in and out: safetensors headers, sources (local, Hub), the one streaming reader, the
bounded-memory writer, split outputs, and task-vector files. See docs/design.md."""
