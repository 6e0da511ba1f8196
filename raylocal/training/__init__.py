"""Training the parts in one process: the part trainer and its guard, the single-process schedules, fault injection."""
