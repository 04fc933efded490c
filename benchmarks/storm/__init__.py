"""Storm simulator: thousands of virtual hosts pulling image layers over a simulated network."""
