"""d2r_lib: the library behind the D2R course (adversarial robustness, D2R loss + CAG)."""
__version__ = "0.1.0"
