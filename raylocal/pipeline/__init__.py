"""The Ray-free parts pipeline: the packet channel, emulated links, the part worker and its loop."""
