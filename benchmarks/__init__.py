"""userloop's benchmarks: ``python -m benchmarks.run [--quick] [--only NAME] [--write]`` (see benchmarks/run.py)."""
