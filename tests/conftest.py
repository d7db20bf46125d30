"""Shared by the trainer's tests: the repository root on sys.path (train_min, trainer/, egrsd and the
spec's helpers import from there), and the project's fixed hypothesis profile (derandomized, no example
database: a run is reproducible and CI never flakes), as in test_egrsd.py, which must stand alone."""
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

settings.register_profile("egrsd", derandomize=True, database=None, deadline=None, max_examples=50,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("egrsd")
