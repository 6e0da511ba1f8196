"""The flow itself: Glow, its layers, the local objectives and the parts it is cut into. No Ray, no training."""
