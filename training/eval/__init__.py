"""Evaluation: FID/KID metrics with the Inception detector, LPIPS, and projection of images into latent space."""
