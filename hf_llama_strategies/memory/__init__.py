"""Memory planning: the static estimate from the plan, the peak of one step from a dry run on fake tensors,
per-rank figures under sharding, and ``plan --fit``'s search for settings that fit.
"""
