"""Run grids of model × recipe and measure each against the original model in the same run."""
