"""Cluster manifests written from one ``AppConfig`` (`medserve cluster render`), so that they cannot drift from it.

serve_config.py      Serve's config file (`serve deploy`, `serve run`) and the application's YAML as a cluster reads it
kuberay.py           a KubeRay RayService, with the Secret holding the application's YAML, the shared volume's claim and
                     the NetworkPolicy of its pods
cluster_launcher.py  a Ray cluster-launcher file for on-premises nodes (`ray up`)
"""

from serve_app.manifests.render import MANIFEST_FILES, render_manifests

__all__ = ["MANIFEST_FILES", "render_manifests"]
