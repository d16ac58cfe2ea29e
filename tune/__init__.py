"""Ray Tune sweeps (``tune/sweep.py``): alpha1, alpha2 (stage 2) and beta (stage 1)."""
