"""Studies: what a hospital sends, read into one ``Volume``; and synthetic studies to test with.

upload.py        spool a request's body to disk within its budget; sort it into DICOM and NIfTI, unzipping safely
reader.py        ``read_study``: an upload folder -> one ``Volume``
dicom_series.py  one DICOM image series, or one enhanced multi-frame image (pydicom; decoding in parallel)
header_processes.py  worker processes that parse a long series' headers for a replica, off its GIL
transfer_syntaxes.py  which DICOM transfer syntaxes are decoded, and by what (415 for others)
dicom_source.py  the source instances' headers, kept for results that reference them (DICOM SEG, SR)
nifti.py         one NIfTI image (nibabel)
checks.py        checks that a study is a real image: spacing, direction cosines, affine, finite voxels
volume.py        ``Volume`` and the 4x4 ``Affine`` it carries
phantoms.py      synthetic CT phantoms with ground truth
sample_data.py   DICOM / NIfTI writers for phantoms
"""
