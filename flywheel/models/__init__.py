"""The policy and reward model code shared by training, evaluation, release and serving."""
