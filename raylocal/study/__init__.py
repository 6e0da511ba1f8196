"""Studies: paired, multi-seed comparisons of arms, their statistics, tables and figures."""
