"""Celery worker pools: ``celery -A workers worker -Q echo`` (or ``vebaq worker --pool echo``).

Importing this package builds nothing: the Celery app that ``celery -A workers`` finds lives in
:mod:`workers.celery` (Celery's convention), made when that module is imported. Function authors
import :mod:`workers.pools` (``@function``) and :mod:`workers.errors` (``PermanentError``).
"""
