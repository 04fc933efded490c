"""Storm simulator: thousands of virtual hosts pulling image layers over a simulated network."""

from p2pd import native

# The simulator uses the compiled core and model whenever a fresh build is there (P2P_NATIVE=0:
# never); see p2pd.native.
native.activate(default=True)
