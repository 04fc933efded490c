"""HTTP/1.1 plumbing shared by p2pd and the supernode: an h11 server on trio with sendfile."""
