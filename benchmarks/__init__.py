"""fcnify's benchmarks: ``python -m benchmarks`` (from the repository root) runs them all; see run_all.py."""
