"""The commands as library calls: each wires sources, the plan, the one stream, a per-tensor
operation and an output, and returns a record (``fapm_cli.records``). See docs/design.md."""
