"""p2pd: the per-host daemon of the layer swarm, and the sans-IO core it shares with the simulator."""

__version__ = "0.1.0"
