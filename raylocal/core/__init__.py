"""The run's ground floor: its configuration, data, checkpoints and log."""
