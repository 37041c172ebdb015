"""optprof: memory and throughput profiler for LLM training optimizers."""

__version__ = "0.1.0"
