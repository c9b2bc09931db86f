"""Hand-engineered cell features: segmentation of nuclei and cells, CellProfiler measurements per object.

- `cellprofiler`: `segment_nuclei`, `segment_cells` (scikit-image), `measure_objects` (CellProfiler's measurement
  modules through `cp_measure`, CellProfiler column names), `measure_cells` (all three for one image).
"""

from vitally_jax.features.cellprofiler import measure_cells, measure_objects, segment_cells, segment_nuclei

__all__ = ["measure_cells", "measure_objects", "segment_cells", "segment_nuclei"]
