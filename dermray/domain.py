"""The domain's constants, importable from anywhere in dermray (this module imports nothing).

HAM10000's seven diagnoses, in the order every probability column, bundle and report uses, and
the three lesion-grouped splits.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
SPLITS: tuple[str, ...] = ("train", "val", "test")
# synthetic data: at least 4 lesions per class, so that every split gets every class
SYNTH_MIN_N = 4 * len(CLASSES)
