"""The suite runs on the Python core unless P2P_NATIVE says otherwise (see p2pd.native);
tests/storm/test_native.py compares the compiled one with it."""

import os

os.environ.setdefault("P2P_NATIVE", "0")
