"""Core services, which know no strategy: the hook contract and plugin manager, where a model keeps its
blocks, the plan (data model, table, picture), the precision decision, the distributed setup, and the
vocabulary options share (layer selection, dtype names, option groups).
"""
