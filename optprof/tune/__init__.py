"""`optprof tune`, the optimizer study's protocol: search spaces, the text it trains on, one trial, the
conclusions (best, noise, inclusion, ranking by budget), and the run that ties them together."""
