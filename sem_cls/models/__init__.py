"""Models: timm backbones with their weights, and the Lightning classifier around them."""
