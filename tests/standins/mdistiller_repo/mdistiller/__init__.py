"""Stand-in of megvii-research/mdistiller (see tests/standins/README.md)."""
