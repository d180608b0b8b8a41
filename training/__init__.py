"""Distill the decomposer: DeepSpeed SFT of a small causal LM on Ray Train (``ray_jobs.train``)."""
