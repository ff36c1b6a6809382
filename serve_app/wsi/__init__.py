"""Whole-slide images (pathology): WSI jobs that turn slides into tumour heatmaps, and their test slides.

The job's path, by file (README: Whole-slide-image jobs):

jobs.py              the API's side: check slides and quotas, record the job, start its driver
job_status.py        the job's request, status record and per-slide summary (pydantic), kept as JSON
job_driver.py        WsiJobDriver, a pool of long-lived Ray actors running the jobs: plan, send units, write results
slide_paths.py       which slide files a tenant may name (its wsi_slide_roots, its uploads)
slides.py            open a slide with the reader for its format, its levels and mpp (what the rest imports)
readers/             one module per library (tifffile, cucim, openslide, wsidicom) and the factory that picks one
tiling.py            the model's tile grid on the right level; blocks of tiles read in one aligned region
tissue.py            tissue detection on a low-resolution level
work_units.py        what the driver sends to the tile model's replicas and what comes back
tile_classifier.py   a tile model on one device (deployments/tile_model.py runs it)
cuda_regions.py      regions decoded on the GPU (nvJPEG), for replicas with one
heatmaps.py          the Zarr heatmap, chunk by chunk, with its ledger of finished chunks
renderings.py        overlay PNG, tissue PNG, QuPath GeoJSON
retention.py         uploaded slides and ended jobs' outputs deleted after wsi.retention_days

synthetic_tissue.py  H&E-like tissue laid out in microns: slide canvases with ground truth, training tiles
synthetic_slides.py  pyramidal, tiled, JPEG-compressed TIFF slides (Aperio SVS layout), written tile by tile
tile_model.py        the embedded tumour / normal tile classifier (its model.yaml), for training and tests
"""
