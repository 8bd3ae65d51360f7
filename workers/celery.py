"""The worker app ``celery -A workers`` finds (Celery looks for ``workers.celery.app``).

Built from the settings (``$VEBAQ_CONFIG`` and the environment) when this module is imported;
a bad configuration ends the process here with one line and the error's exit status.
"""

import sys

from vebaq.core.errors import VebaqError, error_line
from workers.app import create_app
from workers.settings import settings

try:
    app = create_app(settings())
except VebaqError as exc:
    print(error_line(str(exc)), file=sys.stderr)
    raise SystemExit(exc.exit_code) from None

__all__ = ["app"]
