"""The Trainer integration: ``StrategyTrainer``, ``StrategyCallback``, the optimizer groups, schedules at
step boundaries, checkpoints that are complete or absent, resuming, TRL's SFT trainer.
"""
