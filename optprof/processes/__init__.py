"""More than one process: forked worker pools (state-size, predict, tune, check) and isolated trials in fresh
processes (a crash, a kill or a hang becomes a row)."""
