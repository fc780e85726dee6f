"""Validation loss over the first `steps` batches of the val shards, averaged over all ranks."""
import torch


def validation_loss(model, loader, steps, comm, device):
    loader.reset()
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        # dloss 0: the lm head computes the losses only (no dlnf, no wte gradient); nothing of
        # the training state is touched, only activation scratch
        total += model.forward(x.to(device), y.to(device), dloss=0.0).to(torch.float64)
    comm.all_reduce(total)
    comm.synchronize()  # the host waits where the watchdog sees it (a collective may hang)
    return total.item() / (steps * comm.world)
