"""An emulated cluster on one Linux machine: network namespaces as GPUs, a bridge as the switch, and
traffic control shaping each rank's links to intra-node and inter-node rates (`foe cluster`)."""
