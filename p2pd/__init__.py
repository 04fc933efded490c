"""p2pd: the per-host daemon of the layer swarm, and the sans-IO core it shares."""

__version__ = "0.1.0"
