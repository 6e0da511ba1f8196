"""The rivals of training in parts: DDP and local SGD over the emulated link, and the projection of their costs."""
