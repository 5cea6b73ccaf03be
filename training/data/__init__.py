"""Training data: datasets, the embedded synthetic set, the sampler and loader, and ADA augmentation."""
