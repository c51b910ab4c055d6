"""pipeshift's data, installed as the package `pipeshift_data`: the device and model catalogs,
example specs and the traces they name. Code finds it through cost_models.paths.data_dir()."""
