"""Search strategies sharing the pruning environment (layer 4).

`ppo` (AutoSculpt: GNN actor-critic + PPO), `baselines` (random, uniform, magnitude) and `runner`
(the resumable host loop shared by all of them).
"""
