"""Optimizers: the registry (name -> entry), the paper's Adam-mini, and state accounting.

Importing this package imports torch; the CLI imports it lazily so that `optprof --help` stays fast.
"""
