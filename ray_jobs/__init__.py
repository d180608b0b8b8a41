"""Entry points: one linear script per job, each runnable as ``python -m ray_jobs.<job>``."""
