"""User selection (the paper's Table 4).

    strategies.py  pure functions of (features, budget, K, seed), registered by name in STRATEGIES
    statistics.py  the per-user features they read (label variance, source loss, FFN activations)
"""
