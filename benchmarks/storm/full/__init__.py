"""The full-stack storm engine: the real p2pd and supernode on an in-memory network."""
