"""The HTTP API's routes, one FastAPI ``APIRouter`` per route family, each route a few lines: the gatekeeper lets the
request in, the family's service does the work (KServe's shape: endpoints on a router, the work in a data plane
that knows nothing of HTTP).

dependencies.py  ``Services``, one replica's gatekeeper and services, as the routes' FastAPI dependencies; reading
                 a request's parts
viewer.py        the browser pages: /viewer/ and /docs
models.py        /v1/models
segmentation.py  /v1/models/{name}/segment: ``SegmentationService`` (``serve_app.segmentation.service``)
dicomweb.py      /dicomweb: STOW-RS, ``DicomwebService`` (``serve_app.dicomweb.service``)
results.py       /v1/results, /v1/reviews: ``ResultsService`` (``serve_app.results.service``)
wsi.py           /v1/wsi: ``WsiJobs`` (``serve_app.wsi.jobs``)
deliveries.py    /v1/deliveries: the DICOM node's outbox, ``DeliveriesService`` (``serve_app.dicom_network.deliveries``)
v2.py            /v2: the Open Inference Protocol (KServe v2, Triton's) over HTTP
v2_grpc.py       the same protocol over gRPC (``inference.GRPCInferenceService``): RPCs the ingress deployment serves
inference_protocol.py  the protocol's data plane both call, one ``DataPlane`` per replica (``Services.inference``)
                 over ``TensorSegmentation`` (``serve_app.segmentation.tensor_segmentation``)

What every route shares (the host check, the drain, the web headers, the error format, health) is the ingress's
(``deployments/ingress.py``).
"""

from serve_app.api import deliveries, dicomweb, models, results, segmentation, v2, wsi
from serve_app.api.dependencies import SegmentationDep, Services
from serve_app.api.viewer import STATIC_PREFIXES, add_pages

__all__ = ["ROUTERS", "STATIC_PREFIXES", "SegmentationDep", "Services", "add_pages"]

# In the order /openapi.json and /docs list them.
ROUTERS = (
    models.router,
    segmentation.router,
    dicomweb.router,
    results.router,
    wsi.router,
    deliveries.router,
    v2.router,
)
