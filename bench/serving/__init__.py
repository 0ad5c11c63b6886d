"""`python -m bench.serving`: the serving benchmark through the real bot (see __main__.py)."""
