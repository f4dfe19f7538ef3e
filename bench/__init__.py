"""gradwire's benchmark: every figure beside its floor, measured in one run (`make bench`)."""
