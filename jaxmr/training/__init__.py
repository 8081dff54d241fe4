"""Training: the jitted step (`step`), checkpoints and metrics (`checkpoints`), evaluators, the loop, LiT on
cached tower features (`lit`), composed queries (`composed`) and runs as models (`runs`).

Nothing on the serving path imports this package: a server encodes queries without orbax, grain or the training
code (optax it gets from flax.nnx, which imports it for nnx.Optimizer)."""
