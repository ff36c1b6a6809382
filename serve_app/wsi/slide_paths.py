"""Which files a WSI job may read: slides inside the configured roots, or the tenant's own uploads.

A path comes from a request, so nothing about it is trusted: ``..`` is refused outright, symlinks are
followed before the check (a link inside a root pointing out of it is refused), and the answer never says
whether a refused path exists.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from serve_app.errors import BadRequest, Forbidden

__all__ = ["SlidePolicy"]


class SlidePolicy:
    """The folders one tenant's slides may come from.

    Args:
        roots: the tenant's ``tenants.<id>.wsi_slide_roots`` (on an open server, ``wsi.slide_roots``).
        uploads: the tenant's upload folder (``WsiConfig.uploads(tenant)``), readable by that tenant only.

    Usage::

        policy = SlidePolicy(config.tenants[tenant_id].wsi_slide_roots, config.wsi.uploads(tenant_id))
        path = policy.resolve("/mnt/slides/2026/case-1.svs")   # Forbidden (403) outside the roots
    """

    def __init__(self, roots: list[Path], uploads: Path):
        self.roots = [Path(root).resolve() for root in (*roots, uploads)]

    def resolve(self, slide: str) -> Path:
        """The real path of ``slide`` (absolute, or relative to a root), inside a root.

        Raises ``BadRequest`` (400) for ``..`` or an empty path, ``Forbidden`` (403) for a path whose real
        location is outside every root. A path inside a root that does not exist is returned as is: the job
        reports it as that slide's error.
        """
        if not slide or "\x00" in slide:
            raise BadRequest("a slide path is empty or holds a NUL byte")
        raw = PurePosixPath(slide)
        if ".." in raw.parts:
            raise BadRequest(f"slide paths may not contain '..' (got {slide!r})")
        candidates = [Path(raw)] if raw.is_absolute() else [root / raw for root in self.roots]
        # A relative name is judged by the roots where it is there (a file or a link, dangling or not): a link out of
        # one root is refused, not passed over for the same name missing from another root.
        present = [candidate for candidate in candidates if os.path.lexists(candidate)] or candidates
        real_paths = (candidate.resolve() for candidate in present)  # follows every symlink on the way
        inside = [real for real in real_paths if any(real.is_relative_to(root) for root in self.roots)]
        if not inside:
            raise Forbidden(
                "a slide is outside the folders this tenant may read slides from (tenants.<id>.wsi_slide_roots, or "
                "wsi.slide_roots on an open server) and its uploads"
            )
        return next((real for real in inside if real.exists()), inside[0])
