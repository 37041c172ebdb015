"""Helpers the test tiers share: the CLI runner, fake GPUs, tiny architectures, test optimizers, process checks.
Test modules import from here, never from each other."""
