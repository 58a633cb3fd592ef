"""Step records and what reads them: provenance of each step, the Lightning callback that writes it,
run queries (``matsciml runs``), partial outputs of dead processes, and plots of a run."""
