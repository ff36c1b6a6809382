"""The 3D segmentation request's path, as plain objects that the deployments wrap.

stages.py         ``Preprocessor`` -> ``Predictor`` -> ``Postprocessor``, on one device
transforms.py     the MONAI operations they run (pre- and postprocessing)
messages.py       what flows between stages and across deployment boundaries (CPU arrays only)
stage_handles.py  how a caller drives one request through either layout's deployment handles
"""
