"""What commands return: vocabularies, rows, reports with their schema, JSON / CSV in and out, the environment
probe, and profiles (TOML files of expected footprints)."""
