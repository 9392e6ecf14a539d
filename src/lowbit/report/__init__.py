"""Reports: terminal tables, results.jsonl, Pareto plots, atomic writers."""
