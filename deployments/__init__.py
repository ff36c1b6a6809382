"""The Serve deployments of one medserve application, in request order:
ingress -> preprocess -> model -> postprocess."""
