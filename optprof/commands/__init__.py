"""The commands' work, one module each (state_size, compare, predict, check), preflight's decisions and the
micro-batch search: they orchestrate and return reports, and never print."""
