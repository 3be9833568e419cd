"""Temperature scaling (Guo et al. 2017): one scalar T that divides the logits so that the
validation split's negative log-likelihood is smallest. It changes confidences, never the class."""

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, steps: int = 100) -> float:
    """T > 0 minimising the NLL of softmax(logits / T); 1.0 when there is nothing to fit on."""
    logits, targets = logits.detach().double().cpu(), targets.detach().long().cpu()
    if len(logits) == 0:
        return 1.0
    # log T, so T stays positive without constraints; LBFGS converges in a few steps on a scalar.
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    # Bounded: a split the head separates perfectly pushes T towards 0 (infinitely sure).
    return float(log_t.detach().exp().clamp(0.05, 20.0))
