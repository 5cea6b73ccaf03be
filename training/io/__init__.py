"""Files: checkpoints and snapshots, official pickles, downloaded weight files, image grids."""
