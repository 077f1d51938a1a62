"""The engine: WoodFisher and its baselines in pure PyTorch (no pydantic, SQL or HTTP).

``methods`` is the one table of pruning methods; ``pruner`` runs one of them to a target sparsity;
``curvature/`` holds the estimators and block inverses; ``obs`` the saliencies and weight updates.
"""
