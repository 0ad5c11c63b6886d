"""Concept quality on a base model that knows something: a procedural captioned world, a small SD-architecture
model trained on it, attribute readers and concept scores (`python -m bench.quality`; docs/TRAINING.md)."""
