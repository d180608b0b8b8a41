"""Entry points: one thin command per job over its library call ``run(cfg) -> Manifest``, each runnable as
``python -m ray_jobs.<job>`` (what ``ray job submit`` runs) or ``divconq <job>``."""
