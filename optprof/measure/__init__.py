"""Measuring real training steps: one trial per optimizer, each in a fresh process."""
