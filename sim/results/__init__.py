"""What a run leaves: the results folder, the summary metrics, the run report."""
