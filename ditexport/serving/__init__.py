"""Serving many requests: the step-level batching engine, the Ray Serve application and its client.

`app` is the application builder Ray's own tools name: `serve run ditexport.serving:app export_dir=DIR`, or
`import_path: ditexport.serving:app` with `args:` in a `serve deploy` / KubeRay config file."""


def app(args: dict):
    """Ray Serve's application builder (`ditexport.serving.service.app`); imports Ray only when called."""
    from .service import app as build

    return build(args)
