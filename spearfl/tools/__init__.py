"""Tools around the core: `spearfl bench` (speed and memory) and `spearfl compare` (algorithms over seeds)."""
