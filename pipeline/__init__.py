"""divconq: distill the decomposer of a two-stage LLM reasoner and run it on Ray."""

__version__ = "0.1.0"
