"""How ranks share a model: sharding (DDP, ZeRO-1, FSDP2, HSDP, the fake process group), torchrun's ranks,
and folding the rows of a distributed trial's ranks into one."""
