"""EMR: entity-level mask refinement (paper §3.3, Eq.5–8; docs/method.md).

Split (Eq.5–6, ``split``): overlapping object masks are made disjoint; a small overlap goes to the
smaller mask, as does one mask nested in another, and a large one is divided by a guidance mask
from the 64-grid gallery. Merge (Eq.7–8, ``merge``): adjacent pieces whose superpixel centroids
look alike in SAM's feature space are fused when the gallery says they are one thing (the Eq.8
readings: ``mutual``, ``cover``). Everything runs on the working grid (h, w) of the backend.
"""

from esam_core.emr.cover import covering_mask, covering_masks
from esam_core.emr.merge import adjacency, merge_entities, similarity_matrix
from esam_core.emr.mutual import mutual_covers
from esam_core.emr.split import entities_by_score, split_overlaps

__all__ = ["adjacency", "covering_mask", "covering_masks", "entities_by_score", "merge_entities",
           "mutual_covers", "similarity_matrix", "split_overlaps"]
