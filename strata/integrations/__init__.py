"""Glue into vLLM: the ``--load-format strata`` weight-offload loader and the plugin that
registers it. Importing this package imports nothing of vLLM; its modules do."""
