"""The dashboard: a web page served by the API itself (``/ui/``), which signs in with an API key and uses the
JSON API with it (``api.dashboard.routes``; the page's code in ``static/``, its shell in ``templates/``)."""

from api.dashboard.routes import install_dashboard

__all__ = ["install_dashboard"]
