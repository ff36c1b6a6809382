"""Slide readers, one module per library, and the factory that picks one (``serve_app.wsi.slides`` re-exports them).

slide.py             Slide and SlideLevel, what every reader gives; library errors become InvalidSlide in one place
factory.py           open_slide: the format by its signature, the reader for it, fallback, one clear refusal
tifffile_reader.py   tiled pyramidal TIFF and Aperio SVS: parsed and checked once, tiles read with pread and decoded
                     in threads; their JPEG streams for GPU decoding
cucim_reader.py      cuCIM's CuImage on the levels tifffile checked (optional)
openslide_reader.py  OpenSlide: NDPI, MRXS, SCN, Philips TIFF, BIF, SVSLIDE, and SVS, generic TIFF, DICOM WSI too
wsidicom_reader.py   wsidicom: DICOM WSI from a folder of instances (TILED_FULL, TILED_SPARSE, concatenations)
dicomweb_reader.py   wsidicom's DICOMweb source: a DICOM WSI series on a configured PACS, frames fetched by WADO-RS
"""
