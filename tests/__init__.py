"""graphopt tests; a package so test modules of the same basename in subfolders get distinct names."""
