"""Sample data and demo models: synthetic studies and slides, with their ground truth, and what is made from them.

No module of the product imports this package (an import-linter contract in pyproject.toml holds it): the
``medserve sample-*`` commands, ``scripts/``, the benchmarks and the tests do.

phantoms.py          synthetic CT phantoms (HU) with an organ to segment, and its ground truth
study_files.py       a volume written as a hospital sends it: a DICOM CT series, or NIfTI
synthetic_tissue.py  H&E-like tissue laid out in microns: slide canvases with ground truth, training tiles
synthetic_slides.py  pyramidal, tiled, JPEG-compressed TIFF slides (Aperio SVS layout), written tile by tile
tile_network.py      the embedded tumour / normal tile classifier's network, for its training and the tests
bundles.py           a model.yaml model written as a MONAI bundle (``medserve sample-bundle``)
calibration.py       preprocessed phantoms for TensorRT's int8 calibration (``medserve build-tensorrt``)
"""
