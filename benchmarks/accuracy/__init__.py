"""RULER accuracy of the sparse patterns against dense attention (see accuracy/README.md)."""
