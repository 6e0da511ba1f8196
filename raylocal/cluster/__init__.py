"""Ray: connecting, placing and running the part actors, their latent queue, and the checks made before any starts."""
