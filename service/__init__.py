"""The online part of Flywheel: serves the champion policy over HTTP and captures feedback durably.

``service.app.create_app`` builds the FastAPI app from a resolved ``service.config.ServiceConfig``;
``flywheel serve`` is its entry point, ``flywheel export`` moves captured feedback into the raw store.
"""
