# Broken: optimizer(parameters) returns the parameters' settings, not a torch.optim.Optimizer.
from good_minimal import dataloader, model  # noqa: F401


def optimizer(parameters):
    return {"params": parameters, "lr": 0.1}
