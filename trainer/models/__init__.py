"""Base models: finding one (hub id, diffusers folder, single file), picking device and dtype, loading the resident
pipeline; and the tiny random pipeline tests and smoke runs use."""
