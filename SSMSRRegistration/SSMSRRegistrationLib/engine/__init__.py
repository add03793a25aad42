"""SSMSR engine: networks, warping, losses, multi-scale test-time training, metrics (torch only)."""
