"""Studies: what a hospital sends, read into one ``Volume``; and synthetic studies to test with.

upload.py        spool a request's body to disk within its budget; sort it into DICOM and NIfTI, unzipping safely
reader.py        ``read_study``: an upload folder -> one ``Volume``
dicom_series.py  one DICOM image series (pydicom)
nifti.py         one NIfTI image (nibabel)
checks.py        checks that a study is a real image: spacing, direction cosines, affine, finite voxels
volume.py        ``Volume`` and the 4x4 ``Affine`` it carries
phantoms.py      synthetic CT phantoms with ground truth
sample_data.py   DICOM / NIfTI writers for phantoms
"""
