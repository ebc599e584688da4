"""Studies: the lambda study (the demo), sweeps, results tables, plots and reports."""
