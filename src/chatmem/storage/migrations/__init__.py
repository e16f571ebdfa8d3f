"""Alembic migrations of chatmem's schema, run programmatically by ``storage.migrate``.

``env.py`` is Alembic's entry point; each file in ``versions/`` is one revision.  There is
no ``alembic.ini``: :mod:`chatmem.storage.migrate` builds the configuration in code.
"""
