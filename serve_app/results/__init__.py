"""Results on shared storage: the mask, its volumes, and on demand a DICOM SEG and SR of a DICOM study's result.

store.py      ``ResultStore``: results with a retention period, readable only by the tenant that made them
dicom_seg.py  ``build_segmentation``: a mask as a DICOM Segmentation on its source series' frames
dicom_sr.py   ``build_measurement_report``: the labels' volumes as a TID 1500 Measurement Report referencing the SEG
codes.py      the DICOM codes both use
"""

from serve_app.results.store import MASK_FILE, OWNER_FILE, SEG_FILE, SR_FILE, SUMMARY_FILE, ResultStore

__all__ = ["MASK_FILE", "OWNER_FILE", "SEG_FILE", "SR_FILE", "SUMMARY_FILE", "ResultStore"]
