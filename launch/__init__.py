"""Launchers that start `python -m diffusion_jax.main` on several processes or machines.

- `python -m launch.local`: N local CPU processes joined by jax.distributed (testing multi-process code).
- `python -m launch.tpu`: Cloud TPU VMs through `gcloud` (create, setup, train, logs, status, delete, run).
- `python -m launch.slurm`: an sbatch script for multi-node GPU training.

Run them from the repository root; every one has `--dry_run`, which prints the exact commands.
"""
