"""DeepSpeed, FSDP and accelerate configs shipped with vlmtune (see docs/multi-gpu.md)."""
