"""Novelty: how unlike the training images an image is, as the cosine distance of its pooled
backbone features to the nearest training image's. The threshold is the validation split's
quantile, so that share of in-distribution images is flagged; images past it are `unknown`."""

import torch
import torch.nn.functional as F

# The most training images kept as references: 5000 x 2048 float16 is 20 MB in a checkpoint.
MAX_REFERENCES = 5000


def reference_features(features: torch.Tensor, limit: int = MAX_REFERENCES, seed: int = 0):
    """(N, D) training features -> (M <= limit, D) L2-normalised float16, a seeded subset."""
    features = torch.as_tensor(features).float()
    if len(features) > limit:
        generator = torch.Generator().manual_seed(seed)
        features = features[torch.randperm(len(features), generator=generator)[:limit]]
    return F.normalize(features, dim=1).half()


def novelty_scores(features: torch.Tensor, references: torch.Tensor, chunk: int = 1024):
    """(B, D) features -> (B,) cosine distance in [0, 2] to the nearest of (M, D) references."""
    features = F.normalize(features.float(), dim=1)
    references = references.to(features.device).float()
    nearest = [
        (part @ references.T).amax(dim=1) for part in features.split(chunk)
    ]  # (b, D) @ (D, M) -> (b, M) similarities -> (b,)
    return 1 - torch.cat(nearest) if nearest else features.new_zeros(0)


def fit_threshold(val_scores: torch.Tensor, flagged_share: float) -> float:
    """The score above which `flagged_share` of the validation images lie."""
    return float(torch.quantile(val_scores.float(), 1 - flagged_share))
