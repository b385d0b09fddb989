"""Stage 1, the data: the HAM10000 catalog and its checks, the lesion-grouped split, the download
(fetch), synthetic data, and the pure image transforms with the class-balancing plan (augment).
No Ray here."""
