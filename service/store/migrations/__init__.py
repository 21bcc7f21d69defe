"""The store's Alembic migrations, found by ``service.store.database`` as the package
resource ``service.store:migrations``, so no ``alembic.ini`` is needed. A package, so that
setuptools ships it with the service."""
