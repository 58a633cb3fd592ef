"""What matsciml adds to Lightning's Trainer: accelerator names, atomic checkpoint writes, a resumable CSV
logger, exact mid-epoch resume and SLURM requeue into the same run folder."""
