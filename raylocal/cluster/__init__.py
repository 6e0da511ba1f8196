"""Ray: connecting, placing and running the part actors, their latent queue, Ray Train
runs, and the checks made before any starts."""
