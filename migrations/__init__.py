"""The store's Alembic scripts, installed as the package `pipeshift_migrations`. Code finds them
through cost_models.paths.migrations_dir(); `alembic upgrade head` in the repository root
reads them here through alembic.ini."""
