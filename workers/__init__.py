"""Celery worker pools: ``celery -A workers worker -Q echo`` (or ``vebaq worker --pool echo``)."""

from workers.app import create_app

#: The Celery app that ``celery -A workers`` finds.
app = create_app()

__all__ = ["app"]
