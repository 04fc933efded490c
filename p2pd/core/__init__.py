"""The sans-IO heart of the swarm.

Everything in this package is pure computation: no trio, no sockets, no clock reads, no
module-level randomness. Events and ``now`` go in, decisions come out; randomness comes from a
``random.Random`` the caller seeds. The trio daemons and the storm simulator drive these same
objects, so a scheduling change is measured by the simulator exactly as the daemons run it.

Modules:
    digest     -- the ``sha256:<64 hex>`` blob digest, parsed strictly.
    layout     -- how a blob is cut into pieces (the piece-size rule, offsets, lengths).
    bitfield   -- which pieces a peer holds.
    manifest   -- per-piece xxh3-128 hashes that grow as the seeder reads the blob.
    picker     -- the peer-side piece picker (which piece to ask which parent for).
    scheduler  -- the supernode's scheduling state and parent selection.
"""

from p2pd import native

# The daemons use the compiled core only when asked to (P2P_NATIVE=1); see p2pd.native.
native.activate(default=False)
