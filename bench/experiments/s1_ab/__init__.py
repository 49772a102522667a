"""S1's burst, one daemon pinned, run alternately from two checkouts (see ``run``)."""
