from .__main__ import build_parser  # TEMPORARY shim, not committed
