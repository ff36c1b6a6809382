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

import pydicom

# pydicom checks each value against its VR as it reads or sets it and, by default, warns with the value itself
# ("Invalid value for VR DA: '1902-03-04'") through both ``warnings`` and its logger: a malformed birth date or a
# name in the wrong element would reach the replicas' logs, which never hold what a hospital sends. The checks are
# off in every process that reads DICOM (each imports this package): what the server uses of a header it checks
# itself (a 422 naming the element, never its value), and dciodvfy checks the results it writes in the tests.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
